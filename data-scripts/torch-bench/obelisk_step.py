"""One training step of the MIDL OBELISK-Net in PyTorch on the CPU, for comparison with
`cargo run --release -p obelisk-segmentation --example train_bench`.

The network and the step mirror segmentation/src/net.rs and train.rs exactly: 3 pre-smoothed 64^3
volumes, 256 random points each with per-point kernel warps A = I + N(0, 0.2^2), a binary OBELISK
layer with 1024 offset pairs (grid_sample, align_corners=True, zero padding), the 1x1x1 dense
network in its compact form (batch norms that feed only linear layers without scale/shift, dense
convs with a bias; 129,672 parameters for 8 classes), class-weighted NLL on the hardest 25 % of the
points, AdamW (lr 0.002, weight decay 1e-5). Prints the median step time over --steps steps after
warm-up and the process CPU time per step (all threads; unlike wall time it does not grow when
other processes compete for the cores), and optionally the full-volume inference time.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ObeliskNet(nn.Module):
    def __init__(self, classes=8, kernels=1024, hidden=256, mid=128, growth=32, dense_layers=4, groups=4):
        super().__init__()
        self.kernels = kernels
        self.offsets = nn.Parameter(torch.randn(2 * kernels, 3) * 0.05)
        self.conv1 = nn.Conv1d(kernels, hidden, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.conv2 = nn.Conv1d(hidden, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(mid, affine=False)
        self.dense_bn = nn.ModuleList()
        self.dense = nn.ModuleList()
        for i in range(dense_layers):
            c = mid + i * growth
            self.dense_bn.append(nn.BatchNorm1d(c, affine=False) if i > 0 else nn.Identity())
            self.dense.append(nn.Conv1d(c, growth, 1))
        c = mid + dense_layers * growth
        self.bn_out = nn.BatchNorm1d(c, affine=False)
        self.head = nn.Conv1d(c, classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.xavier_normal_(m.weight, gain=2**0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def sample(self, vol, points, affine):
        """vol (1, 1, D, H, W), points (1, P, 3), affine (1, P, 3, 3) or None -> (1, K, P)."""
        p = points.shape[1]
        if affine is None:
            off = self.offsets.view(1, 1, -1, 3)
        else:
            off = torch.matmul(affine.view(-1, 3, 3), self.offsets.t()).view(1, p, 3, -1).transpose(2, 3)
        grid = (points.unsqueeze(2) + off).reshape(1, -1, 1, 1, 3)
        v = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True).view(1, p, -1)
        k = self.kernels
        return (v[:, :, :k] - v[:, :, k:]).transpose(1, 2)

    def head_t(self, h):
        x = F.relu(self.bn1(self.conv1(h)))
        x = self.bn2(self.conv2(x))
        for bn, conv in zip(self.dense_bn, self.dense):
            x = torch.cat((x, F.relu(conv(bn(x)))), 1)
        return self.head(self.bn_out(x))


def ohem_nll(logits, labels, weights, fraction=0.25):
    nll = F.cross_entropy(logits, labels, reduction="none")
    k = max(1, int(-(-fraction * nll.numel() // 1)))
    idx = torch.topk(nll.detach(), k).indices
    w = weights[labels[idx]]
    return (nll[idx] * w).sum() / w.sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--infer-size", type=int, default=0, help="also time full-volume inference at N^3")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = ObeliskNet()
    n_par = sum(p.numel() for p in net.parameters())
    print(f"PyTorch {torch.__version__}: OBELISK-Net {n_par} parameters, {torch.get_num_threads()} threads")
    n = args.size
    vols = [F.avg_pool3d(torch.randn(1, 1, n, n, n), (3, 5, 5), 1, (1, 2, 2)) for _ in range(3)]
    pts = [torch.rand(1, 256, 3) * 2 - 1 for _ in range(3)]
    aff = [torch.eye(3) + 0.2 * torch.randn(1, 256, 3, 3) for _ in range(3)]
    labels = torch.randint(0, 8, (768,))
    weights = torch.rand(8) + 0.5
    opt = torch.optim.AdamW(net.parameters(), lr=0.002, weight_decay=1e-5)
    net.train()

    def step():
        h = torch.cat([net.sample(v, p, a) for v, p, a in zip(vols, pts, aff)], 2)
        loss = ohem_nll(net.head_t(h)[0].t(), labels, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(2):
        step()
    times = []
    cpu0 = time.process_time()
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / args.steps
    print(f"training step (768 points): median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, {args.steps} steps), "
          f"CPU time {cpu * 1e3:.1f} ms/step")

    if args.infer_size:
        m = args.infer_size
        q = m // 4
        vol = torch.randn(1, 1, m, m, m)
        net.eval()
        with torch.no_grad():
            t = time.perf_counter()
            x = F.avg_pool3d(vol, (3, 5, 5), 1, (1, 2, 2))
            lin = [torch.linspace(-1, 1, q)] * 3
            zz, yy, xx = torch.meshgrid(*lin, indexing="ij")
            grid = torch.stack((xx, yy, zz), -1).view(1, -1, 3)
            outs = [net.head_t(net.sample(x, grid[:, s:s + 8192], None)) for s in range(0, grid.shape[1], 8192)]
            y = torch.cat(outs, 2).view(1, 8, q, q, q)
            y = F.interpolate(y, size=(m, m, m), mode="trilinear", align_corners=True).argmax(1)
            dt = time.perf_counter() - t
        print(f"inference {m}^3 ({q}^3 grid): {dt * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
