from setuptools import setup

# metadata and packages live in setup.cfg
setup()
