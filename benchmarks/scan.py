"""Scan micro-benchmark: the reverse diagonal scan `g_t = e_t + a * g_{t+1}` of DSF, in every form the package has,
with its achieved memory bandwidth (bytes of e read + g written, per second) and, on a known GPU, the share of the
card's peak bandwidth.

Forms: `torch` (`scan_sfrnn.reverse_scan_` in place over the whole sequence), `torch_chunks` (the same chunk by
chunk with carries, as the torch backward runs it). The Triton backend has no scan of its own to time: its scan is
fused into the pointwise backward kernel, timed in `benchmarks/layer.py`.

    python benchmarks/scan.py                          # batch 32, S = 512, T in {256, 1024}
    python benchmarks/scan.py --device cuda --dtype bfloat16 --states 512 1024 --lengths 256 1024 4096
"""

import argparse

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf.fused_sfrnn import DSF_CHUNK
from sfrnn_hf.scan_sfrnn import reverse_scan_

# Peak memory bandwidth of cards we may be lent, bytes per second (vendor figures).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12,
                  "A100-SXM4-40GB": 1.56e12, "A100-PCIE-40GB": 1.56e12, "L4": 0.3e12}


def card_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BANDWIDTH.items():
        if key in name:
            return peak
    return None


def torch_scan(errors_tm, feedback, chunk):
    """The torch scan over the whole sequence `(time, batch, S)`, chunk by chunk from the end."""
    g = errors_tm.float().clone()
    carry = None
    for end in range(g.shape[0], 0, -chunk):
        carry = reverse_scan_(g[max(0, end - chunk) : end], feedback, carry)
    return g


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--states", nargs="+", type=int, default=[512])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of e")
    parser.add_argument("--forms", nargs="+", default=["torch", "torch_chunks"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    peak = card_peak(device)
    print(machine_description(device))
    print(load_line())
    print(f"peak bandwidth: {peak / 1e12:.2f} TB/s" if peak else "peak bandwidth: unknown for this device")
    print(f"{'S':>5s} {'T':>5s} {'form':13s} {'ms':>9s} {'GB/s':>8s} {'% peak':>7s}")
    for width in args.states:
        feedback = torch.linspace(0, 1, width, device=device)
        for length in args.lengths:
            errors = torch.randn(args.batch, length, width, device=device).to(dtype)
            errors_tm = errors.transpose(0, 1).contiguous()
            forms = {"torch": lambda: torch_scan(errors_tm, feedback, length),
                     "torch_chunks": lambda: torch_scan(errors_tm, feedback, DSF_CHUNK)}
            forms = {k: v for k, v in forms.items() if k in args.forms}
            seconds = interleaved_timings(forms, device, args.warmup, args.repeats).median
            # bytes: e read in its dtype, g written in fp32 (the accumulation dtype)
            moved = errors.numel() * (errors.element_size() + 4)
            for name, sec in seconds.items():
                rate = moved / sec
                share = f"{100 * rate / peak:6.1f}%" if peak else "     -"
                print(f"{width:5d} {length:5d} {name:13s} {sec * 1000:9.3f} {rate / 1e9:8.1f} {share}")


if __name__ == "__main__":
    main()
