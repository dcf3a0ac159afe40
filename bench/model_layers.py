"""Where MobileNet v1's time goes, layer by layer, with fastcnn's layers and with the stock ops
they replace: the model of `fastcnn bench --op models` run leaf module by leaf module under the
`cpu` (or `cuda`) backend and under `reference`, passes interleaved, median time of each leaf per
pass. It shows what the whole-model ratio hides, e.g. that the stock 1x1 convolutions run slower
after fastcnn's depthwise layers than after PyTorch's own (README, "Whole models").

    python bench/model_layers.py --batch 1 --layout channels_last
    python bench/model_layers.py --batch 8 --layout nchw --per-layer

(MobileNet only: it is a plain chain of leaf modules, which the STN classifier, whose sampler
takes two inputs, is not.)
"""
import argparse
import statistics
import time

import torch

import fastcnn
from fastcnn.bench_cases import models

MODEL = "mobilenet_v1"

def leaves(module):
    children = list(module.children())
    if not children:
        return [module]
    return [leaf for child in children for leaf in leaves(child)]


def layer_times(model, x, backends, rounds, device):
    """{backend: [median seconds of leaf i]} over `rounds` interleaved inference passes."""
    layers = leaves(model)
    times = {b: [[] for _ in layers] for b in backends}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(rounds):
            for backend in backends:
                with fastcnn.use_backend(backend):
                    h = x
                    for i, layer in enumerate(layers):
                        sync()
                        start = time.perf_counter()
                        # MobileNetV1.forward flattens the pooled features before its classifier.
                        h = layer(torch.flatten(h, 1) if isinstance(layer, torch.nn.Linear) else h)
                        sync()
                        times[backend][i].append(time.perf_counter() - start)
    skip = min(2, rounds - 1)  # warm-up passes
    return layers, {b: [statistics.median(t[skip:]) for t in ts] for b, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layout", default="channels_last", choices=("nchw", "channels_last"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-layer", action="store_true", help="one line per leaf, not per kind")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels_last = args.layout == "channels_last"
    model = models._model(MODEL, torch.float32, device, channels_last)
    x = torch.randn(args.batch, *models._IMAGES[MODEL], device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    backends = [device.type, "reference"]
    layers, medians = layer_times(model, x, backends, args.rounds, device)
    print(f"{MODEL} {tuple(x.shape)} {args.layout} on {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} passes a backend: median ms a pass, fastcnn[{device.type}] / stock")
    if args.per_layer:
        for i, layer in enumerate(layers):
            ours, stock = medians[device.type][i] * 1e3, medians["reference"][i] * 1e3
            print(f"{i:3d} {layer!r:80.80s} {ours:8.3f} {stock:8.3f}")
    kinds = {}
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        kinds.setdefault(kind, [0.0, 0.0])
        kinds[kind][0] += medians[device.type][i] * 1e3
        kinds[kind][1] += medians["reference"][i] * 1e3
    for kind, (ours, stock) in kinds.items():
        print(f"{kind:20s} {ours:8.3f} {stock:8.3f}")
    total = [sum(medians[b]) * 1e3 for b in backends]
    print(f"{'total':20s} {total[0]:8.3f} {total[1]:8.3f}")


if __name__ == "__main__":
    main()
