"""An independent, deliberately naive implementation of the LESA layer as
``docs/lesa.md`` (sections 1-5) states it.

It works on *reference-layout* weights (the authors' key names,
``docs/lesa.md`` section 8) and builds every relative-position index with
explicit Python loops, so it shares no code with lesa_mm. Tests compare
lesa_mm (loaded through the converter) against it.
"""
import torch
import torch.nn.functional as F

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def batch_norm(x, sd, prefix, training, new_stats):
    """BatchNorm over dim 1 of ``x`` written out by hand; in training mode
    records the updated running statistics in ``new_stats``."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dim=dims)
        var = ((x - mean.view(shape))**2).mean(dim=dims)
        count = x.numel() // x.shape[1]
        unbiased = var.detach() * count / (count - 1)
        new_stats[prefix + 'running_mean'] = (
            (1 - BN_MOMENTUM) * sd[prefix + 'running_mean'] +
            BN_MOMENTUM * mean.detach())
        new_stats[prefix + 'running_var'] = (
            (1 - BN_MOMENTUM) * sd[prefix + 'running_var'] +
            BN_MOMENTUM * unbiased)
    else:
        mean, var = sd[prefix + 'running_mean'], sd[prefix + 'running_var']
    x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS)
    return x * sd[prefix + 'weight'].view(shape) + sd[prefix + 'bias'].view(shape)


def reference_state_dict(cin, c, groups, pe_type, feat, dcn=False, seed=0,
                         df_channel_shrink=(2, ), df_kernel_size=(1, 1),
                         df_group=(1, 1), unary=True):
    """Random weights and BN statistics in the authors' layout; the fusion
    as the authors' ``df_*`` lists give it. ``unary=False``: the binary term
    alone (no unary, no fusion keys)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    dq, dv = c // (2 * groups), c // groups
    sd = {'qkv_transform.weight': rnd(2 * c, cin, 1, scale=cin**-0.5)}

    def bn(prefix, n):
        sd[prefix + 'weight'] = 1 + 0.2 * rnd(n)
        sd[prefix + 'bias'] = 0.2 * rnd(n)
        sd[prefix + 'running_mean'] = 0.2 * rnd(n)
        sd[prefix + 'running_var'] = 0.5 + torch.rand(n, generator=gen)
        sd[prefix + 'num_batches_tracked'] = torch.tensor(3)

    bn('bn_qkv.', 2 * c)
    if pe_type == 'classification':
        length = feat * feat
        bn('bn_similarity.', 3 * groups)
        bn('bn_output.', 2 * c)
        sd['relative'] = rnd(2 * dq + dv, 2 * length - 1, scale=dv**-0.5)
        sd['flatten_index'] = torch.arange(length * length)
    else:
        bn('bn_similarity.', 2 * groups)
        bn('bn_output.', c)
        sd['rel_height'] = rnd(2 * feat - 1, dq, scale=dq**-0.5)
        sd['rel_width'] = rnd(2 * feat - 1, dq, scale=dq**-0.5)
    if not unary:
        return sd
    sd['x_transform.0.weight'] = rnd(c, cin // groups, 3, 3, scale=0.3)
    if dcn:
        sd['x_transform.0.conv_offset.weight'] = rnd(18, cin, 3, 3, scale=0.05)
        sd['x_transform.0.conv_offset.bias'] = rnd(18, scale=0.3)
    if groups != 1:
        sd['x_transform.1.weight'] = rnd(c, c, 1, 1, scale=c**-0.5)
    bn('bn_x.', c)
    channels = 2 * c
    for i, shrink in enumerate(df_channel_shrink):
        out, k, g = int(channels / shrink), df_kernel_size[i], df_group[i]
        fan_in = channels // g * k * k
        sd[f'reasoning.{1 + 3 * i}.weight'] = rnd(
            out, channels // g, k, k, scale=fan_in**-0.5)
        bn(f'reasoning.{2 + 3 * i}.', out)
        channels = out
    k, g = df_kernel_size[-1], df_group[-1]
    sd['projection.0.weight'] = rnd(c, channels // g, k, k,
                                    scale=(channels // g * k * k)**-0.5)
    bn('projection.1.', c)
    return sd


def _unary(x, sd, groups, training, stats):
    w = sd['x_transform.0.weight']
    if 'x_transform.0.conv_offset.weight' in sd:
        from torchvision.ops import deform_conv2d
        offset = F.conv2d(x, sd['x_transform.0.conv_offset.weight'],
                          sd['x_transform.0.conv_offset.bias'], padding=1)
        u = deform_conv2d(x, offset, w, padding=1)
    else:
        u = F.conv2d(x, w, padding=1, groups=groups)
    if 'x_transform.1.weight' in sd:
        u = F.conv2d(u, sd['x_transform.1.weight'])
    return batch_norm(u, sd, 'bn_x.', training, stats)


def _binary(x, sd, groups, pe_type, feat, training, stats):
    n, cin, h, w = x.shape
    length = h * w
    c = sd['qkv_transform.weight'].shape[0] // 2
    dq, dv = c // (2 * groups), c // groups
    t = F.conv1d(x.reshape(n, cin, length), sd['qkv_transform.weight'])
    t = batch_norm(t, sd, 'bn_qkv.', training, stats)
    t = t.view(n, groups, 2 * dq + dv, length)
    q, k, v = t[:, :, :dq], t[:, :, dq:2 * dq], t[:, :, 2 * dq:]
    s_qk = torch.einsum('ngci,ngcj->ngij', q, k)
    if pe_type == 'detection_qr':
        idx_h = torch.zeros(length, length, dtype=torch.long)
        idx_w = torch.zeros(length, length, dtype=torch.long)
        for i in range(length):
            for j in range(length):
                idx_h[i, j] = (j // w) - (i // w) + feat - 1
                idx_w[i, j] = (j % w) - (i % w) + feat - 1
        th = sd['rel_height'][idx_h]  # (L, L, dq)
        tw = sd['rel_width'][idx_w]
        s_r = (torch.einsum('ngci,ijc->ngij', q, th) +
               torch.einsum('ngci,ijc->ngij', q, tw))
        z = batch_norm(torch.cat([s_qk, s_r], 1), sd, 'bn_similarity.',
                       training, stats)
        z = z[:, :groups] + z[:, groups:]
    else:
        k_len = feat * feat
        idx = torch.zeros(length, length, dtype=torch.long)
        for i in range(length):
            for j in range(length):
                idx[i, j] = i - j + k_len - 1
        e = sd['relative']
        eq, ek, ev = e[:dq], e[dq:2 * dq], e[2 * dq:]
        s_qr = torch.einsum('ngci,cij->ngij', q, eq[:, idx])
        # S_kr[i, j] = k_j . Ek[j - i]; idx.t()[i, j] = j - i + K - 1
        s_kr = torch.einsum('ngcj,cij->ngij', k, ek[:, idx.t()])
        z = batch_norm(torch.cat([s_qk, s_qr, s_kr], 1), sd,
                       'bn_similarity.', training, stats)
        z = z[:, :groups] + z[:, groups:2 * groups] + z[:, 2 * groups:]
    a = torch.softmax(z, dim=-1)
    o_v = torch.einsum('ngij,ngcj->ngci', a, v).reshape(n, c, length)
    if pe_type == 'detection_qr':
        b = batch_norm(o_v, sd, 'bn_output.', training, stats)
    else:
        o_e = torch.einsum('ngij,cij->ngci', a, ev[:, idx]).reshape(
            n, c, length)
        channels = []
        for m in range(c):
            channels += [o_v[:, m], o_e[:, m]]
        stacked = torch.stack(channels, dim=1)  # interleaved (N, 2C, L)
        normed = batch_norm(stacked, sd, 'bn_output.', training, stats)
        b = normed[:, 0::2] + normed[:, 1::2]
    return b.reshape(n, c, h, w)


def spec_lesa(x, sd, groups, pe_type, feat, stride=1, training=False,
              fusion='gate'):
    """LESA forward per the spec. Returns ``(y, updated_running_stats)``.

    The fusion's depth, kernels and groups are read from the weights'
    shapes (the authors' ``df_*`` lists); ``fusion='sum'`` gives ``u + b``.
    Weights without unary keys give the binary term alone.
    """
    stats = {}
    if 'bn_x.weight' not in sd:
        y = _binary(x, sd, groups, pe_type, feat, training, stats)
        if stride > 1:
            y = F.avg_pool2d(y, stride, stride)
        return y, stats
    u = _unary(x, sd, groups, training, stats)
    b = _binary(x, sd, groups, pe_type, feat, training, stats)
    if fusion == 'sum':
        y = u + b
    else:
        z = F.relu(torch.cat([u, b], 1))
        i = 1
        while f'reasoning.{i}.weight' in sd:
            weight = sd[f'reasoning.{i}.weight']
            z = F.conv2d(z, weight, padding=(weight.shape[-1] - 1) // 2,
                         groups=z.shape[1] // weight.shape[1])
            z = F.relu(batch_norm(z, sd, f'reasoning.{i + 1}.', training,
                                  stats))
            i += 3
        weight = sd['projection.0.weight']  # unpadded, as the authors'
        gate = F.conv2d(z, weight, groups=z.shape[1] // weight.shape[1])
        gate = torch.sigmoid(batch_norm(gate, sd, 'projection.1.', training,
                                        stats))
        y = u + gate * b
    if stride > 1:
        y = F.avg_pool2d(y, stride, stride)
    return y, stats
