"""The data path against the recipes it follows, by construction, on synthetic images whose content
is known: the random-resized crop is cut from the whole stored image (a 4:3 photo shows its sides),
evaluation is torchvision's Resize(S) + CenterCrop(res) to the pixel, a 32 px image is enlarged
bilinearly, and predict prepares an image as eval does."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from ecvl_fast.loaders.canvas import canvas_side, fitted
from ecvl_fast.loaders.dali_graph import CLIP_MEAN, CLIP_STD
from ecvl_fast.loaders.dali_loader import AugmentedLoader
from ecvl_fast.loaders.draws import AugSpec, crop_boxes, uniforms, CROP_STREAMS
from ecvl_fast.loaders.ffcv_loader import make_loader

RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)


def pixels(views: torch.Tensor) -> np.ndarray:
    """Normalised NCHW views -> 0..255 NHWC."""
    x = views.permute(0, 2, 3, 1) * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
    return x.numpy()


def banded(w: int, h: int) -> np.ndarray:
    """A 4:3 photo: grey, with a red band down its left sixth and a blue one down its right sixth,
    both outside its centre square."""
    img = np.full((h, w, 3), GREY, np.uint8)
    img[:, : w // 6], img[:, w - w // 6 :] = RED, BLUE
    return img


def smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Content that tells pixels apart: two crossed ramps and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x * 7 + y * 3) % 256], -1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A converted folder: banded 4:3 photos (train), and photos of known content at three sizes (test)."""
    from ecvl_fast.loaders.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("photos")
    for c in range(2):
        (root / "src" / "train" / f"c{c}").mkdir(parents=True)
        (root / "src" / "test" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(banded(96, 72)).save(root / "src" / "train" / f"c{c}" / f"{i}.png")
    tests = {
        "exact": smooth(85, 64),
        "large": smooth(120, 90, 1),
        "tall": smooth(60, 80, 2),
        "small": smooth(40, 30, 3),
    }
    for i, (name, img) in enumerate(tests.items()):
        Image.fromarray(img).save(root / "src" / "test" / f"c{i % 2}" / f"{i}-{name}.png")
    convert(ConvertOptions("folder", root / "data", source=root / "src", workers=1))
    files = sorted((root / "src" / "test").rglob("*.png"))  # convert's order: by class folder, then name
    return root / "data", files


def test_the_random_crop_reaches_every_edge_of_a_4_3_photo(photos):
    """Decoded whole (not its centre square), so the red and blue sides, which lie outside the
    centre square, reach training views; and the boxes span the whole width."""
    data, _ = photos
    loader = make_loader(data / "train.beton", "random", 8, 32, workers=1)
    seen = {"red": 0, "blue": 0}
    aug = AugmentedLoader(
        loader, AugSpec(res=32, train=True, views=2, randaug=False, crop_scale=(0.08, 1.0)), prefetch=0
    )
    for epoch in range(4):
        aug.epoch = epoch
        for views, _, _ in aug:
            for x in map(pixels, views):  # views a tenth of which is a side band (none in the centre square)
                seen["red"] += int((((x[..., 0] > 180) & (x[..., 2] < 80)).mean((1, 2)) > 0.1).sum())
                seen["blue"] += int((((x[..., 2] > 180) & (x[..., 0] < 80)).mean((1, 2)) > 0.1).sum())
    assert seen["red"] > 0 and seen["blue"] > 0, seen
    r = uniforms(0, 0, np.arange(4000), CROP_STREAMS)
    box = crop_boxes(r, (0.08, 1.0), aspect=np.full(4000, 4 / 3))
    assert box[:, 1].min() < 0.01 and box[:, 3].max() > 0.99 and box[:, 0].min() < 0.01 and box[:, 2].max() > 0.99
    w_px, h_px = (box[:, 3] - box[:, 1]) * 96, (box[:, 2] - box[:, 0]) * 72
    assert 3 / 4 - 1e-3 <= (w_px / h_px).min() and (w_px / h_px).max() <= 4 / 3 + 1e-3  # torchvision's pixel ratios


def eval_views(data, res: int, resize: int, interp: str = "linear") -> dict[int, np.ndarray]:
    loader = make_loader(data / "test.beton", "sequential", 4, resize, workers=1)
    spec = AugSpec(res=res, train=False, randaug=False, eval_resize=resize, interp=interp)
    aug = AugmentedLoader(loader, spec, prefetch=0)
    views, _, idx = next(iter(aug))
    return dict(zip(idx.tolist(), pixels(views[0])))


def torchvision_eval(img: np.ndarray, res: int, resize: int) -> np.ndarray:
    pil = TF.center_crop(TF.resize(Image.fromarray(img), resize, antialias=True), res)
    return np.asarray(pil).astype(np.float64)


def test_the_evaluation_crop_matches_torchvision_to_the_pixel(photos):
    """Resize(64) + CenterCrop(56): where the short side is already 64 the two are the same pixels;
    where it is resized the pixels agree within resampling (OpenCV's area filter against
    torchvision's antialiased bilinear), and a crop one pixel off agrees much worse."""
    data, files = photos
    out = eval_views(data, 56, 64)
    for i, path in enumerate(files):
        img = np.asarray(Image.open(path))
        ref, got = torchvision_eval(img, 56, 64), out[i]
        if "exact" in path.name:
            np.testing.assert_array_equal(np.round(got), ref)
        else:
            assert np.abs(got - ref).mean() < 2.5, path.name
        shifted = torchvision_eval(np.roll(img, 1, axis=1), 56, 64)
        assert np.abs(got - shifted)[:, 2:-2].mean() > 3 * max(0.3, np.abs(got - ref)[:, 2:-2].mean()), path.name


def test_predict_prepares_an_image_as_eval_does(photos):
    from ecvl_fast.serving.classifier import decode

    data, files = photos
    for res, resize in ((56, 64), (32, 32), (96, 110)):
        out = eval_views(data, res, resize)
        for i, path in enumerate(files):
            assert np.abs(decode(path, resize, res).astype(np.float64) - out[i]).max() <= 1.01, (res, path.name)


def test_a_32px_image_is_enlarged_bilinearly_not_in_blocks(tmp_path, cifar10_dir):
    """CIFAR at 224 px: Resize(256) + CenterCrop(224) with bilinear interpolation, as the recipes
    upsample; ffcv never enlarges (the canvas is the stored 32 px), DALI's linear filter does."""
    import pickle

    from ecvl_fast.loaders.convert import ConvertOptions, convert

    test = pickle.loads((cifar10_dir / "test_batch").read_bytes())  # texture, where nearest and bilinear part
    test["data"] = np.random.default_rng(0).integers(0, 256, test["data"].shape).astype(np.uint8)
    (cifar10_dir / "test_batch").write_bytes(pickle.dumps(test))
    convert(ConvertOptions("cifar10-lt", tmp_path / "c10", source=cifar10_dir, imbalance=10, workers=1))
    loader = make_loader(tmp_path / "c10" / "test.beton", "sequential", 4, 256, workers=1)
    images, _, idx = next(iter(loader))
    assert images.shape[1:] == (32, 32, 3)  # the stored image, not an area-filter upscale of it
    got = eval_views(tmp_path / "c10", 224, 256)
    for i in idx.tolist()[:2]:
        img = images[idx.tolist().index(i)].numpy()
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        bilinear = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[0, :, 16:240, 16:240]
        nearest = F.interpolate(x, size=(256, 256), mode="nearest")[0, :, 16:240, 16:240]
        bilinear, nearest = bilinear.permute(1, 2, 0).numpy(), nearest.permute(1, 2, 0).numpy()
        assert np.abs(got[i] - bilinear).max() <= 1.01
        assert np.abs(got[i] - nearest).mean() > 5 * np.abs(got[i] - bilinear).mean()
    # LIFT+'s bicubic (aug.interp = "cubic") where the crop is enlarged, Resize(36) + CenterCrop(32): predict
    # prepares the image as eval does, within the small difference of torch's and DALI's cubic kernels
    from ecvl_fast.serving.classifier import decode

    cubic, linear = eval_views(tmp_path / "c10", 32, 36, "cubic"), eval_views(tmp_path / "c10", 32, 36)
    for i in idx.tolist()[:2]:
        prepared = decode(Image.fromarray(images[idx.tolist().index(i)].numpy()), 36, 32, interp="cubic")
        near, apart = np.abs(prepared - cubic[i]).mean(), np.abs(linear[i] - cubic[i]).mean()
        assert near < 0.1 * apart


def test_the_canvas_fit_follows_torchvision_resize():
    """The short side to S (the long one truncated as torchvision's Resize), unless the long side
    passes the 4/3 S canvas; never enlarged."""
    side = canvas_side(64, 1000)
    h, w = fitted([90, 80, 30, 64, 50, 400], [120, 60, 40, 85, 400, 100], 64, side)
    assert side == 86 and list(zip(h.tolist(), w.tolist())) == [
        (64, 85),
        (80, 60),
        (30, 40),
        (64, 85),
        (10, 86),
        (86, 21),
    ]


def test_five_crop_views_are_lifts(photos):
    """LIFT's test-time views: torchvision's Resize(res + 24/224 res) then FiveCrop(res) of the whole
    image, in its order, from the eval loader and from predict's preparation alike."""
    from ecvl_fast.serving.classifier import decode
    from ecvl_fast.training.data import five_crop_resize

    data, files = photos
    resize = five_crop_resize(56)
    loader = make_loader(data / "test.beton", "sequential", 4, resize, workers=1)  # as eval_loader decodes for them
    aug = AugmentedLoader(loader, AugSpec(res=56, train=False, views=5, randaug=False, eval_resize=resize), prefetch=0)
    views, _, idx = next(iter(aug))
    assert resize == 62 and len(views) == 5
    for k, i in enumerate(idx.tolist()):
        img = Image.fromarray(np.asarray(Image.open(files[i])))
        refs = [np.asarray(c).astype(np.float64) for c in TF.five_crop(TF.resize(img, resize, antialias=True), 56)]
        got = [pixels(v)[k] for v in views]
        for v in range(5):
            errors = [np.abs(got[v] - r).mean() for r in refs]
            assert int(np.argmin(errors)) == v and errors[v] < 3.0, (files[i].name, v, errors)
        prepared = decode(files[i], 64, 56, crops=5).astype(np.float64)
        assert prepared.shape == (5, 56, 56, 3) and np.abs(prepared - np.stack(got)).max() <= 1.01
