"""Train the demo feature net (promoe.eval.feature_net) on Fashion-MNIST's training split, on the CPU.

    python -m promoe.eval.train_feature_net [--data /usr/share/datasets/fashion-mnist] [--out PATH] [--epochs 5]

Prints the test-split accuracy and writes the weights and config to --out
(default runs/feature_net/fashion_feature_net.safetensors), which `promoe.eval.load_feature_net` reads.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from promoe.data import load_fashion_mnist
from promoe.data.pixels import FASHION_MNIST_DIR
from promoe.eval.feature_net import DEFAULT_FEATURE_NET, FeatureNet, grey_images, save_feature_net


def train(images: np.ndarray, labels: np.ndarray, epochs: int = 5, batch_size: int = 128, lr: float = 2e-3,
          seed: int = 0, log=print) -> FeatureNet:
    """Adam with a cosine learning rate over `epochs` passes of uint8 [N, 28, 28] images; random horizontal flips
    (a mirrored garment is the same class)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet()
    x, y = grey_images(images), torch.as_tensor(labels)
    steps = epochs * (len(x) // batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for step in range(len(x) // batch_size):
            batch = order[step * batch_size:(step + 1) * batch_size]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            inputs = torch.where(flip.view(-1, 1, 1, 1), x[batch].flip(-1), x[batch])
            loss = F.cross_entropy(net(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: mean loss {total / max(1, len(x) // batch_size):.4f}")
    return net.eval()


@torch.inference_mode()
def accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    x, y = grey_images(images), torch.as_tensor(labels)
    correct = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(FASHION_MNIST_DIR), help="folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(DEFAULT_FEATURE_NET))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; the convolutions are small, so one thread wastes little and is not slowed "
                             "down by other processes on the machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_images, train_labels = load_fashion_mnist(args.data, "train")
    test_images, test_labels = load_fashion_mnist(args.data, "test")
    print(f"training the feature net on {len(train_images)} Fashion-MNIST images, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    net = train(train_images, train_labels, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(net, test_images, test_labels)
    print(f"test accuracy {test_accuracy:.4f} ({len(test_images)} images), trained in {seconds:.0f} s")
    save_feature_net(net, args.out, test_accuracy=test_accuracy, epochs=args.epochs, seed=args.seed,
                     train_seconds=round(seconds, 1), data="fashion-mnist")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
