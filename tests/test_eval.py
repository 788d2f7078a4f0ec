import json
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from promoe.data.pixels import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from promoe.eval import (
    FIDInceptionV3,
    GaussianStats,
    check_state_dict,
    frechet_distance,
    inception_score,
    load_feature_net,
    load_inception,
    manifold_radii,
    open_images,
    pixel_features,
    pixel_fid,
    precision_recall,
    resize_bilinear_tf1,
    save_feature_net,
)
from promoe.eval import metrics as metrics_module
from promoe.evaluate import main as evaluate_main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches gain little from a second thread, and lose a lot when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# float64 statistics: the sums of 50-ish products of O(1) numbers agree to ~1e-15 relative; sqrtm's backward error
# is ~1e-13 for these small, well-conditioned matrices. float32 pipelines (resize, Inception): ~1e-6 relative.


def random_features(seed: int, n: int = 200, d: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


# ---------------------------------------------------------------- Fréchet distance and streaming statistics


def test_frechet_distance_matches_scipy_sqrtm_and_symmetric_form_on_random_features():
    a, b = random_features(0), random_features(1, shift=0.5)
    mu1, sigma1, mu2, sigma2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    by_sqrtm = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(linalg.sqrtm(sigma1 @ sigma2).real))
    # independent route: tr (s1 s2)^(1/2) = tr (s1^(1/2) s2 s1^(1/2))^(1/2), all symmetric, by eigendecomposition
    values, vectors = np.linalg.eigh(sigma1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    by_eigh = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(inner))
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid == pytest.approx(by_sqrtm, rel=1e-10)
    assert fid == pytest.approx(by_eigh, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = rng.uniform(0.1, 3, size=10), rng.uniform(0.1, 3, size=10)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-12)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-12)


def test_frechet_distance_offsets_the_diagonals_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(3)
    s1, s2 = rng.uniform(0.5, 2, size=6), rng.uniform(0.5, 2, size=6)
    real_sqrtm, calls = linalg.sqrtm, []

    def sqrtm_failing_first(matrix, *args, **kwargs):
        calls.append(matrix)
        if len(calls) == 1:
            return np.full_like(matrix, np.inf)
        return real_sqrtm(matrix, *args, **kwargs)

    monkeypatch.setattr(metrics_module.linalg, "sqrtm", sqrtm_failing_first)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        fid = frechet_distance(np.zeros(6), np.diag(s1), np.zeros(6), np.diag(s2))
    eps = 1e-6
    assert np.allclose(calls[1], np.diag((s1 + eps) * (s2 + eps)))
    assert fid == pytest.approx(np.sum(s1 + s2 - 2 * np.sqrt((s1 + eps) * (s2 + eps))), rel=1e-12)


def test_frechet_distance_rejects_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_streaming_statistics_equal_numpy_mean_and_cov_for_any_batch_size(batch_size):
    features = random_features(4, n=300, d=12, shift=2.0).astype(np.float32)
    stats = GaussianStats(12)
    for start in range(0, len(features), batch_size):
        stats.update(features[start:start + batch_size])
    exact = features.astype(np.float64)
    assert stats.count == 300
    np.testing.assert_allclose(stats.mu, exact.mean(0), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(exact, rowvar=False), rtol=1e-11, atol=1e-13)


def test_streaming_statistics_take_torch_tensors_and_reject_a_wrong_dimension():
    features = torch.randn(20, 5, generator=torch.Generator().manual_seed(5))
    stats = GaussianStats(5).update(features[:9]).update(features[9:])
    np.testing.assert_allclose(stats.sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="dimension 4"):
        stats.update(torch.zeros(2, 4))


# ---------------------------------------------------------------- Inception Score, precision and recall


def numpy_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The evaluator's formula, written plainly in float64."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_matches_numpy_reference_with_5000_sample_splits():
    logits = np.random.default_rng(6).normal(scale=3, size=(12000, 20))  # splits of 5000, 5000, 2000
    assert inception_score(logits) == pytest.approx(numpy_inception_score(logits, 5000), rel=1e-12)
    assert inception_score(logits[:300], split_size=100) == pytest.approx(
        numpy_inception_score(logits[:300], 100), rel=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = 50.0 * np.eye(8)[np.arange(800) % 8]
    assert inception_score(logits) == pytest.approx(8, rel=1e-9)


def numpy_precision_recall(ref: np.ndarray, sam: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall by loops over float64 squared distances."""
    def sqdist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sqdist(ref, ref), axis=1)[:, k]  # index 0 is the point itself
    sam_radii = np.sort(sqdist(sam, sam), axis=1)[:, k]
    d_rs = sqdist(ref, sam)
    precision = np.mean([any(d_rs[i, j] <= ref_radii[i] for i in range(len(ref))) for j in range(len(sam))])
    recall = np.mean([any(d_rs[i, j] <= sam_radii[j] for j in range(len(sam))) for i in range(len(ref))])
    return float(precision), float(recall)


@pytest.mark.parametrize("block", [7, 1024])
def test_precision_recall_match_numpy_reference(block):
    ref = random_features(7, n=60, d=8)
    sam = random_features(8, n=45, d=8, shift=0.6) * 1.3
    precision, recall = precision_recall(ref, sam, block=block)
    assert (precision, recall) == numpy_precision_recall(ref, sam)
    assert 0 < precision < 1 and 0 < recall < 1


def test_manifold_radii_are_squared_distances_to_the_third_neighbour():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # neighbours of 0: 1, 3, 6 -> 36; of 10: 6, 3, 1 -> 81; of 3: 1 or 6 (both 2 or 3 away), 0 -> 9
    np.testing.assert_allclose(manifold_radii(points).numpy(), [36, 25, 9, 25, 81])


def test_precision_recall_of_a_set_against_itself_are_one():
    features = random_features(9, n=40)
    assert precision_recall(features, features) == (1.0, 1.0)


# ---------------------------------------------------------------- TF1 bilinear resize


def numpy_tf1_resize(image_HW: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False: one output pixel at a time. As in TF's
    kernel, the source coordinate is float32: float(i) * (float(in) / float(out))."""
    in_h, in_w = image_HW.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = float(np.float32(i) * (np.float32(in_h) / np.float32(out_h)))
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1)
        for j in range(out_w):
            x = float(np.float32(j) * (np.float32(in_w) / np.float32(out_w)))
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), in_w - 1)
            top = image_HW[y0, x0] + (image_HW[y0, x1] - image_HW[y0, x0]) * (x - x0)
            bottom = image_HW[y1, x0] + (image_HW[y1, x1] - image_HW[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


@pytest.mark.parametrize("in_hw, out_hw", [((5, 7), (13, 11)), ((32, 32), (299, 299)), ((300, 310), (299, 299)),
                                           ((9, 9), (9, 9)), ((8, 6), (3, 4))])
def test_tf1_resize_matches_numpy_loop_reference(in_hw, out_hw):
    images = torch.randint(0, 256, (2, 3, *in_hw), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    resized = resize_bilinear_tf1(images, out_hw)
    assert resized.shape == (2, 3, *out_hw) and resized.dtype == torch.float32
    expected = numpy_tf1_resize(images[1, 2].double().numpy(), *out_hw)
    # float32 blends of values up to 255: error ~ 255 * 2**-24 * a few operations
    np.testing.assert_allclose(resized[1, 2].numpy(), expected, atol=1e-4, rtol=0)
    if in_hw == out_hw:
        assert torch.equal(resized, images.float())


def test_tf1_resize_is_not_torch_half_pixel_interpolate():
    images = torch.randint(0, 256, (1, 1, 32, 32), generator=torch.Generator().manual_seed(11)).float()
    ours = resize_bilinear_tf1(images, (299, 299))
    torch_resize = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_resize).abs().max() > 10  # different conventions, not rounding
    assert ours[0, 0, 0, 0] == images[0, 0, 0, 0]  # TF1: output pixel 0 samples input pixel 0 exactly
    assert ours[0, 0, 298, 298] == images[0, 0, 31, 31]  # and the far edge clamps to the last pixel
    shifted = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=True)
    assert (ours - shifted).abs().max() > 10  # nor align_corners=True


# ---------------------------------------------------------------- the FID Inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random FID Inception saved as pytorch-fid's file is (no num_batches_tracked), with non-trivial BN stats."""
    torch.manual_seed(12)
    model = FIDInceptionV3()
    state = {name: tensor for name, tensor in model.state_dict().items() if "num_batches_tracked" not in name}
    for name, tensor in state.items():
        if name.endswith("running_mean") or name.endswith("bn.bias"):
            tensor.normal_(0, 0.1)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path, state


def test_inception_state_dict_has_the_pt_inception_layout(inception_weights):
    _, state = inception_weights
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch1x1.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight"):
        assert key in state
    assert sum(t.numel() for n, t in state.items() if "running" not in n) == 23_850_960  # torchvision's, 1008 cls


def test_inception_loads_weights_from_a_file_and_gives_feature_shapes(inception_weights):
    path, state = inception_weights
    model = load_inception(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert not model.training
    images = torch.randint(0, 256, (2, 40, 48, 3), generator=torch.Generator().manual_seed(13), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(images)
        alone = model(images[1:])
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 7 * 17 * 17)
    assert out["logits"].shape == (2, 1008)
    assert all(torch.isfinite(value).all() for value in out.values())
    assert out["pool"].std() > 1e-3  # a random network still tells images apart
    torch.testing.assert_close(alone["pool"], out["pool"][1:], rtol=1e-4, atol=1e-5)  # float32, batch-independent
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)  # the evaluator's bias-free logits


def test_spatial_features_are_mixed_6d_1x1_branch_first_7_channels_in_nhwc_order(inception_weights):
    model = load_inception(inception_weights[0])
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
    images = torch.randint(0, 256, (1, 24, 24, 3), generator=torch.Generator().manual_seed(14), dtype=torch.uint8)
    with torch.inference_mode():
        spatial = model(images)["spatial"]
    branch_NCHW = captured["out"]
    assert branch_NCHW.shape == (1, 192, 17, 17)
    # flat index (h * 17 + w) * 7 + c, as TF's [N, 17, 17, 7] reshaped to [N, 2023]
    assert spatial[0, (3 * 17 + 5) * 7 + 2] == branch_NCHW[0, 2, 3, 5]
    torch.testing.assert_close(spatial.view(1, 17, 17, 7), branch_NCHW[:, :7].permute(0, 2, 3, 1))


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("Mixed_6b.branch7x7_2.conv.weight"), "missing key 'Mixed_6b.branch7x7_2.conv.weight'"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)), r"'fc.weight' has shape \(1000, 2048\)"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1)), "unexpected key 'AuxLogits.fc.weight'"),
])
def test_inception_rejects_a_wrong_state_dict_naming_the_key(inception_weights, tmp_path, corrupt, message):
    state = dict(inception_weights[1])
    corrupt(state)
    with pytest.raises(ValueError, match=message):
        check_state_dict(FIDInceptionV3(), state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as error:
        load_inception(path)
    assert str(path) in str(error.value)


def test_missing_inception_weights_path_is_a_clear_error_without_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded") as error:
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert "pytorch-fid/releases" in str(error.value) and str(tmp_path) in str(error.value)


# ---------------------------------------------------------------- image sets and the CLI


def test_npz_images_stream_in_batches_and_png_folders_read_the_same(tmp_path):
    rng = np.random.default_rng(15)
    images = rng.integers(0, 256, (7, 9, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", arr_0=images, arr_1=np.arange(7))
    source = open_images(tmp_path / "set.npz")
    assert len(source) == 7
    assert np.array_equal(np.concatenate(list(source.batches(3))), images)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(pngs / f"{index:03d}.png")
    assert np.array_equal(np.concatenate(list(open_images(pngs).batches(4))), images)
    np.savez(pngs / "samples.npz", arr_0=images[:2])  # the sampling CLI's folder: its samples.npz wins
    assert len(open_images(pngs)) == 2


def test_grey_images_are_repeated_to_rgb(tmp_path):
    grey = np.random.default_rng(16).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    (tmp_path / "pngs").mkdir()
    Image.fromarray(grey[0, ..., 0]).save(tmp_path / "pngs" / "a.png")
    assert np.array_equal(next(open_images(tmp_path / "grey.npz").batches(8)), np.repeat(grey, 3, -1))
    assert np.array_equal(next(open_images(tmp_path / "pngs").batches(8))[0], np.repeat(grey[0], 3, -1))


@pytest.mark.parametrize("write, message", [
    (lambda p: np.savez(p, arr_0=np.zeros((2, 8, 8, 3), np.float32)), "dtype float32; expected uint8"),
    (lambda p: np.savez(p, arr_0=np.zeros((2, 3, 8, 8), np.uint8)), "channels first"),
    (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)), r"no 'arr_0' array \(it holds \['images'\]\)"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
])
def test_wrong_sample_files_are_clear_errors(tmp_path, write, message):
    path = tmp_path / "samples.npz"
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        open_images(path)
    assert str(path) in str(error.value)


def test_png_folder_with_mixed_sizes_names_the_odd_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        list(open_images(tmp_path).batches(4))


@pytest.fixture
def cli_data(tmp_path):
    """A sampling-CLI folder (samples.npz + sampling.json) and a reference .npz holding only images."""
    rng = np.random.default_rng(17)
    samples_dir = tmp_path / "samples"
    samples_dir.mkdir()
    np.savez(samples_dir / "samples.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
             arr_1=np.arange(6))
    (samples_dir / "sampling.json").write_text(json.dumps({"cfg_scale": 1.5, "steps": 250}))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8))
    return samples_dir, tmp_path / "ref.npz"


def test_evaluate_cli_writes_metrics_json_and_reuses_saved_reference_stats(inception_weights, cli_data, tmp_path,
                                                                          monkeypatch, capsys):
    calls = []

    def cheap_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
        # scipy's sqrtm of a 2048 x 2048 matrix takes 10+ s on one core: the real one runs in the slow test below
        calls.append((np.shape(mu1), np.shape(sigma1), np.shape(mu2), np.shape(sigma2)))
        return float(np.sum((np.asarray(mu1) - np.asarray(mu2)) ** 2))

    monkeypatch.setattr(metrics_module, "frechet_distance", cheap_frechet)
    samples_dir, ref = cli_data
    weights = str(inception_weights[0])
    metrics = evaluate_main([str(samples_dir), "--ref", str(ref), "--inception", weights, "--batch-size", "4",
                             "--device", "cpu", "--save-ref", str(tmp_path / "stats.npz")])
    assert calls == [((2048,), (2048, 2048)) * 2, ((2023,), (2023, 2023)) * 2]  # FID, then sFID
    printed = capsys.readouterr().out
    assert "inception_score" in printed and "recall" in printed
    written = json.loads((samples_dir / "metrics.json").read_text())
    assert written["sampling"] == {"cfg_scale": 1.5, "steps": 250}
    assert written["num_samples"] == 6 and written["samples"] == str(samples_dir / "samples.npz")
    assert written["fid"] > 0 and written["inception_score"] >= 1
    assert 0 <= written["precision"] <= 1 and 0 <= written["recall"] <= 1

    with np.load(tmp_path / "stats.npz") as stats:  # the evaluator's reference layout plus our pool features
        assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
        assert stats["pool"].shape == (8, 2048)
    again = evaluate_main([str(samples_dir / "samples.npz"), "--ref", str(tmp_path / "stats.npz"),
                           "--inception", weights, "--batch-size", "5"])
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert again[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6)  # float32 features, other batches


def test_evaluate_cli_exits_with_the_message_of_a_bad_input(inception_weights, cli_data, tmp_path):
    samples_dir, ref = cli_data
    with pytest.raises(SystemExit, match="Nothing is downloaded"):
        evaluate_main([str(samples_dir), "--ref", str(ref), "--inception", str(tmp_path / "none.pth")])
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(SystemExit, match="channels first"):
        evaluate_main([str(tmp_path / "nchw.npz"), "--ref", str(ref), "--inception", str(inception_weights[0])])
    np.savez(tmp_path / "nothing.npz", labels=np.zeros(3))
    with pytest.raises(SystemExit, match="neither reference statistics"):
        evaluate_main([str(samples_dir), "--ref", str(tmp_path / "nothing.npz"),
                       "--inception", str(inception_weights[0])])


@pytest.mark.slow
def test_evaluate_cli_fid_equals_frechet_distance_of_directly_computed_features(inception_weights, cli_data):
    samples_dir, ref = cli_data
    metrics = evaluate_main([str(samples_dir), "--ref", str(ref), "--inception", str(inception_weights[0])])
    model = load_inception(inception_weights[0])
    with torch.inference_mode():
        sam = model(torch.from_numpy(np.load(samples_dir / "samples.npz")["arr_0"]))
        ref_out = model(torch.from_numpy(np.load(ref)["arr_0"]))
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        a, b = sam[key].double().numpy(), ref_out[key].double().numpy()
        direct = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        # 6 and 8 images in ~2000 dimensions: singular covariances, whose square root amplifies float32 noise
        assert metrics[metric] == pytest.approx(direct, rel=1e-3)
    assert metrics["inception_score"] == pytest.approx(inception_score(sam["logits"].numpy()), rel=1e-5)
    assert (metrics["precision"], metrics["recall"]) == precision_recall(ref_out["pool"], sam["pool"])


# ---------------------------------------------------------------- the Fashion-MNIST feature net

needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / name).exists() for name in FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"]),
    reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion():
    from promoe.data import load_fashion_mnist

    return load_fashion_mnist(FASHION_MNIST_DIR, "train"), load_fashion_mnist(FASHION_MNIST_DIR, "test")


@pytest.fixture(scope="module")
def brief_net(fashion):
    from promoe.eval.train_feature_net import train

    (images, labels), _ = fashion
    return train(images[:20000], labels[:20000], epochs=1, seed=0, log=lambda line: None)


@needs_fashion
def test_feature_net_trained_briefly_classifies_test_images(brief_net, fashion):
    from promoe.eval.train_feature_net import accuracy

    _, (test_images, test_labels) = fashion
    assert accuracy(brief_net, test_images[:2000], test_labels[:2000]) >= 0.78  # measured 0.82 after 20K images


@needs_fashion
def test_pixel_fid_is_zero_for_a_set_against_itself_and_large_against_noise(brief_net, fashion):
    _, (test_images, _) = fashion
    a, b = test_images[:1000], test_images[1000:2000]
    noise = np.random.default_rng(18).integers(0, 256, a.shape, dtype=np.uint8)
    assert pixel_fid(a, a, brief_net, batch_size=300) == pytest.approx(0, abs=1e-6)
    between_halves = pixel_fid(a, b, brief_net)
    assert pixel_fid(noise, a, brief_net) > 20 * between_halves


@needs_fashion
def test_pixel_features_accept_the_three_grey_layouts_and_reject_floats(brief_net, fashion):
    _, (test_images, _) = fashion
    images = test_images[:50]
    reference = pixel_features(images, brief_net)
    assert reference.shape == (50, 128) and reference.dtype == np.float32
    for layout in (images[..., None], images[:, None], torch.from_numpy(images)):
        # float32 convolutions may pick other kernels for other batch sizes: ~1e-6 relative
        np.testing.assert_allclose(pixel_features(layout, brief_net, batch_size=16), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected uint8"):
        pixel_features(images.astype(np.float32), brief_net)
    with pytest.raises(ValueError, match="expected"):
        pixel_features(images[:, :20], brief_net)


@needs_fashion
def test_feature_net_round_trips_through_safetensors(brief_net, fashion, tmp_path):
    _, (test_images, _) = fashion
    path = tmp_path / "net.safetensors"
    save_feature_net(brief_net, path, test_accuracy=0.5)
    loaded = load_feature_net(path)
    assert loaded.info == {"test_accuracy": 0.5}
    np.testing.assert_array_equal(pixel_features(test_images[:20], loaded), pixel_features(test_images[:20], brief_net))


def test_missing_feature_net_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m promoe.eval.train_feature_net"):
        load_feature_net(tmp_path / "none.safetensors")


@needs_fashion
@pytest.mark.slow
def test_feature_net_cli_reaches_88_percent_test_accuracy(tmp_path, capsys):
    from promoe.eval.train_feature_net import main

    main(["--out", str(tmp_path / "net.safetensors")])
    net = load_feature_net(tmp_path / "net.safetensors")
    assert net.info["test_accuracy"] >= 0.88
    assert "test accuracy" in capsys.readouterr().out


def test_no_warnings_from_frechet_distance_on_well_conditioned_statistics():
    a, b = random_features(19), random_features(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
