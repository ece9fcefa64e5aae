"""Tests for afa_nodes.core.dataset and core.encode_cache (host-free: tiny PIL images in tmp_path)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from afa_nodes.core import dataset as ds
from afa_nodes.core import encode_cache
from afa_nodes.core.dataset import ImageDataset, load_image, make_buckets, split_indices, to_model_pixels
from afa_nodes.core.encode_cache import CachedLatentDataset, build_latent_cache, build_text_cache
from afa_nodes.core.errors import AFAError, DatasetError


def img(path, size=(64, 64), color=(255, 0, 0), mode="RGB", fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, color)
    im.save(path, format=fmt, **save)
    return path


def gradient(path, w, h):
    """Pixel value encodes its x coordinate in R and y in G."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = (np.arange(w) * 255 // max(w - 1, 1))[None, :]
    a[..., 1] = (np.arange(h) * 255 // max(h - 1, 1))[:, None]
    Image.fromarray(a).save(path)
    return path


class Encoder:
    """Fake VAE: [B,H,W,3] -> [B,3,H/8,W/8] by average pooling; counts calls/images."""

    def __init__(self):
        self.calls, self.images = 0, 0

    def __call__(self, x):
        assert x.ndim == 4 and x.shape[-1] == 3 and 0.0 <= x.min() and x.max() <= 1.0
        self.calls += 1
        self.images += x.shape[0]
        return torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 8)


def test_captions_read_and_non_images_ignored(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red square \n")
    img(tmp_path / "b.jpg", color=(0, 0, 255))
    (tmp_path / "b.txt").write_text("blue")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "orphan.txt").write_text("caption without image")
    d = ImageDataset(tmp_path, resolution=32)
    assert [d.name(i) for i in range(len(d.entries))] == ["a.png", "b.jpg"]
    assert d.captions == ["a red square", "blue"]
    assert d.report.images == 2 and d.report.missing_captions == 0 and d.report.skipped_corrupt == 0
    item = d[1]
    assert item["caption"] == "blue" and item["image"].shape == (32, 32, 3)
    assert item["image"].dtype == torch.float32
    assert item["image"][..., 2].min() > 0.9 and item["image"][..., 0].max() < 0.1


def test_kohya_repeat_folders(tmp_path):
    img(tmp_path / "3_cat" / "c1.png")
    img(tmp_path / "3_cat" / "c2.png")
    img(tmp_path / "plain" / "p.png")
    img(tmp_path / "root.png")
    d = ImageDataset(tmp_path, resolution=32)
    reps = {d.name(i): e.repeats for i, e in enumerate(d.entries)}
    assert reps == {"3_cat/c1.png": 3, "3_cat/c2.png": 3, "plain/p.png": 1, "root.png": 1}
    assert d.report.images == 4 and d.report.repeats == 8 and len(d) == 8
    c1 = next(i for i, e in enumerate(d.entries) if e.path.name == "c1.png")
    assert d.samples.count(c1) == 3


def test_metadata_jsonl_and_csv(tmp_path):
    img(tmp_path / "j" / "x.png")
    img(tmp_path / "j" / "sub" / "y.png")
    with open(tmp_path / "j" / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "x.png", "text": "from jsonl"}) + "\n\n")
        f.write(json.dumps({"file_name": "sub/y.png", "text": "nested"}) + "\n")
    d = ImageDataset(tmp_path / "j", resolution=32)
    caps = {d.name(i): e.caption for i, e in enumerate(d.entries)}
    assert caps == {"x.png": "from jsonl", "sub/y.png": "nested"} and d.report.missing_captions == 0

    img(tmp_path / "c" / "u.png")
    img(tmp_path / "c" / "v.png")
    (tmp_path / "c" / "v.txt").write_text("txt wins")
    (tmp_path / "c" / "metadata.csv").write_text('file_name,text\nu.png,"hello, csv"\nv.png,meta\n')
    d = ImageDataset(tmp_path / "c", resolution=32)
    assert d.captions == ["hello, csv", "txt wins"]


def test_bad_metadata_raises(tmp_path):
    img(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(DatasetError, match="file_name"):
        ImageDataset(tmp_path, resolution=32)


def test_exif_orientation_applied(tmp_path):
    # Stored 40x20: left half red, right half blue. Orientation 6 = display rotated 90° CW,
    # so the displayed image is 20x40 with red on top and blue at the bottom.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)
    d = ImageDataset(tmp_path, resolution=16)
    assert d.entries[0].size == (20, 40)
    x = d.image(0)
    assert x.shape == (16, 16, 3)
    assert x[2, 2, 0] > 0.8 and x[2, 2, 2] < 0.2      # top is red
    assert x[13, 2, 2] > 0.8 and x[13, 2, 0] < 0.2    # bottom is blue
    # with bucketing the portrait orientation decides the bucket
    b = ImageDataset(tmp_path, resolution=256, bucketing=True)
    assert b.image(0).shape == (320, 192, 3)


def test_formats_gif_first_frame_alpha(tmp_path):
    img(tmp_path / "a.webp", fmt="WEBP")
    img(tmp_path / "b.bmp")
    img(tmp_path / "c.tiff")
    img(tmp_path / "d.png", mode="RGBA", color=(0, 0, 0, 0))  # transparent -> white
    frames = [Image.new("RGB", (32, 32), (0, 255, 0)), Image.new("RGB", (32, 32), (255, 0, 0))]
    frames[0].save(tmp_path / "e.gif", save_all=True, append_images=frames[1:])
    d = ImageDataset(tmp_path, resolution=32)
    assert d.report.images == 5 and d.report.skipped_corrupt == 0
    assert d.image(3).min() > 0.95
    g = d.image(4)
    assert g[..., 1].mean() > 0.9 and g[..., 0].mean() < 0.1  # first frame is green


def test_corrupt_skipped_counted_and_logged_once(tmp_path, caplog):
    img(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    good = img(tmp_path / "trunc.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.INFO, logger="ComfyUI-AFA"):
        d = ImageDataset(tmp_path, resolution=32)
    assert d.report.images == 1 and d.report.skipped_corrupt == 2
    assert d.report.corrupt_files == ["bad.png", "trunc.jpg"]
    recs = [r for r in caplog.records if "bad.png" in r.getMessage()]
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert "trunc.jpg" in recs[0].getMessage()


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="could be read"):
        ImageDataset(tmp_path, resolution=32)


@pytest.mark.parametrize("setup", ["empty", "only_text", "missing"])
def test_no_images_raises(tmp_path, setup):
    folder = tmp_path / "data"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "a.txt").write_text("x")
    with pytest.raises(DatasetError) as ei:
        ImageDataset(folder, resolution=32)
    msg = str(ei.value)
    assert str(folder) in msg and ".txt" in msg and "metadata.jsonl" in msg
    assert isinstance(ei.value, AFAError) and isinstance(ei.value, ValueError)


def test_missing_caption_counted(tmp_path, caplog):
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("cap")
    img(tmp_path / "nocap.png")
    with caplog.at_level(logging.INFO, logger="ComfyUI-AFA"):
        d = ImageDataset(tmp_path, resolution=32)
    assert d.captions == ["cap", ""] and d.report.missing_captions == 1
    assert any("nocap.png" in r.getMessage() for r in caplog.records)


def test_small_image_upscaled(tmp_path):
    img(tmp_path / "tiny.png", size=(8, 12))
    img(tmp_path / "big.png", size=(64, 64))
    d = ImageDataset(tmp_path, resolution=32)
    assert d.report.upscaled == 1
    assert d.image(1).shape == (32, 32, 3)


def test_center_vs_random_crop(tmp_path):
    gradient(tmp_path / "wide.png", 128, 64)
    c = ImageDataset(tmp_path, resolution=32)
    assert c.crop_box(0) == (64, 32, 16, 0)
    x = c.image(0)
    assert abs(x[:, 16, 0].mean().item() - 0.5) < 0.05  # center column of the crop ~ mid image
    r1 = ImageDataset(tmp_path, resolution=32, crop="random", seed=1)
    r2 = ImageDataset(tmp_path, resolution=32, crop="random", seed=1)
    assert torch.equal(r1.image(0), r2.image(0)) and r1.crop_box(0, 3) == r2.crop_box(0, 3)
    by_seed = {ImageDataset(tmp_path, resolution=32, crop="random", seed=s).crop_box(0) for s in range(8)}
    by_variant = {r1.crop_box(0, v) for v in range(8)}
    assert len(by_seed) > 1 and len(by_variant) > 1
    assert all(0 <= b[2] <= 32 and b[3] == 0 for b in by_seed | by_variant)
    with pytest.raises(DatasetError):
        ImageDataset(tmp_path, resolution=32, crop="diagonal")


def test_buckets():
    b = make_buckets(512)
    assert (512, 512) in b and (640, 384) in b and (384, 640) in b
    for w, h in b:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.85 * 512 ** 2 <= w * h <= 512 ** 2 and max(w, h) / min(w, h) <= 2
    assert ds.nearest_bucket((1000, 600), b) == (640, 384)
    assert ds.nearest_bucket((700, 700), b) == (512, 512)


def test_bucketing_shapes_and_batches(tmp_path):
    for k in range(3):
        img(tmp_path / f"land{k}.png", size=(300, 150))
        img(tmp_path / f"port{k}.png", size=(150, 300))
    img(tmp_path / "sq.png", size=(300, 300))
    d = ImageDataset(tmp_path, resolution=256, bucketing=True)
    shapes = {d.name(i): tuple(d.image(i).shape) for i in range(len(d.entries))}
    assert shapes["land0.png"] == (192, 320, 3)
    assert shapes["port0.png"] == (320, 192, 3)
    assert shapes["sq.png"] == (256, 256, 3)
    enc = Encoder()
    cache = build_latent_cache(d, enc, "vae", tmp_path / ".cache", batch_size=8)
    assert enc.calls == 3  # one batch per bucket
    cl = CachedLatentDataset(cache)
    assert sorted(set(cl.buckets)) == [(192, 320), (256, 256), (320, 192)]
    for k in range(len(cl)):
        w, h = cl.buckets[k]
        assert cl[k]["latent"].shape == (3, h // 8, w // 8) and cl[k]["target"] == (w, h)


def test_latent_cache_hit_second_run(tmp_path):
    for k in range(3):
        gradient(tmp_path / "data" / f"{k}.png", 40 + k * 8, 40)
    d = ImageDataset(tmp_path / "data", resolution=32)
    enc = Encoder()
    c1 = build_latent_cache(d, enc, "vae-abc", tmp_path / "cache", batch_size=2)
    assert (enc.calls, enc.images, c1.hits, c1.misses) == (2, 3, 0, 3)
    assert c1.latent(0).shape == (3, 4, 4)
    enc2 = Encoder()
    d2 = ImageDataset(tmp_path / "data", resolution=32)
    c2 = build_latent_cache(d2, enc2, "vae-abc", tmp_path / "cache", batch_size=2)
    assert enc2.calls == 0 and (c2.hits, c2.misses) == (3, 0)
    assert torch.equal(c1.latent(2), c2.latent(2))
    # another encoder identity or resolution -> new entries
    enc3 = Encoder()
    build_latent_cache(d2, enc3, "vae-other", tmp_path / "cache")
    assert enc3.images == 3
    enc4 = Encoder()
    build_latent_cache(ImageDataset(tmp_path / "data", resolution=16), enc4, "vae-abc", tmp_path / "cache")
    assert enc4.images == 3


def test_changed_image_invalidates_entry(tmp_path):
    gradient(tmp_path / "data" / "a.png", 40, 40)
    img(tmp_path / "data" / "b.png", size=(40, 40))
    build_latent_cache(ImageDataset(tmp_path / "data", resolution=32), Encoder(), "k", tmp_path / "c")
    img(tmp_path / "data" / "b.png", size=(40, 40), color=(0, 255, 0))  # same name, new content
    enc = Encoder()
    c = build_latent_cache(ImageDataset(tmp_path / "data", resolution=32), enc, "k", tmp_path / "c")
    assert (enc.calls, enc.images, c.hits, c.misses) == (1, 1, 1, 1)
    assert c.latent(1)[1].mean() > 0.9  # green channel of the new content


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    for k in range(3):
        img(tmp_path / "data" / f"{k}.png", size=(32, 32), color=(k, 0, 0))
    d = ImageDataset(tmp_path / "data", resolution=32)
    cache = build_latent_cache(d, Encoder(), "k", tmp_path / "c")
    build_text_cache(["a", "b"], lambda caps: torch.ones(len(caps), 2), "t", tmp_path / "c")
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert len(files) == 3 + 3 and all(p.suffix == ".safetensors" for p in files)
    assert not any(p.name.startswith(".") or p.name.endswith(".tmp") for p in files)

    def broken_save(tensors, filename, metadata=None):  # dies half-way through writing
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(encode_cache, "save_file", broken_save)
    with pytest.raises(OSError):
        build_latent_cache(d, Encoder(), "k2", tmp_path / "c")
    after = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert sorted(after) == sorted(files)
    assert all(p.exists() for row in cache.files for p in row)


def test_encoder_bad_output_raises(tmp_path):
    img(tmp_path / "a.png", size=(32, 32))
    d = ImageDataset(tmp_path, resolution=32)
    with pytest.raises(DatasetError, match="encode_images"):
        build_latent_cache(d, lambda x: torch.zeros(5, 4), "k", tmp_path / ".c")


def test_text_cache(tmp_path):
    calls = []

    def enc(caps):
        calls.append(list(caps))
        n = len(caps)
        return {"cond": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 3, 4).clone(),
                "pooled": torch.ones(n, 4), "none": None}

    t1 = build_text_cache(["a", "b", "a"], enc, "clip1", tmp_path, batch_size=2)
    assert calls == [["", "a"], ["b"]] and (t1.hits, t1.misses) == (0, 3)
    assert set(t1.get("b")) == {"cond", "pooled"} and t1.get("b")["cond"].shape == (3, 4)
    calls.clear()
    t2 = build_text_cache(["b", "a"], enc, "clip1", tmp_path)
    assert calls == [] and (t2.hits, t2.misses) == (3, 0)
    # per-caption list output (prompts of different token lengths) and a plain tensor
    t3 = build_text_cache(["x"], lambda caps: [torch.zeros(len(c) + 1, 2) for c in caps], "clip2", tmp_path)
    assert t3.get("x")["cond"].shape == (2, 2) and t3.get("")["cond"].shape == (1, 2)
    with pytest.raises(DatasetError, match="encode_texts"):
        build_text_cache(["y"], lambda caps: torch.zeros(7, 2), "clip3", tmp_path)


def test_cached_latent_dataset_items_split_and_variants(tmp_path):
    gradient(tmp_path / "2_rep" / "a.png", 96, 32)
    (tmp_path / "2_rep" / "a.txt").write_text("alpha")
    gradient(tmp_path / "b.png", 32, 32)
    (tmp_path / "b.txt").write_text("beta")
    gradient(tmp_path / "c.png", 32, 32)
    d = ImageDataset(tmp_path, resolution=32, crop="random", seed=3)
    enc = Encoder()
    lat = build_latent_cache(d, enc, "vae", tmp_path / ".cache", crop_variants=4)
    # 4 distinct crops of the wide image; a square 32px image has one crop box, and b/c
    # have identical content, so they share one cache entry
    assert enc.images == 5 and all(len(row) == 4 for row in lat.files)
    assert len({p for row in lat.files for p in row}) == 5
    texts = {m: build_text_cache(d.captions, lambda caps: torch.zeros(len(caps), 2, 3), m, tmp_path / ".cache")
             for m in ("model_a", "model_b")}
    cl = CachedLatentDataset(lat, texts, seed=0)
    assert len(cl) == 4 and cl.captions[0] == ""
    item = cl[0]
    assert item["caption"] == "alpha" and cl.captions[item["caption_index"]] == "alpha"
    assert item["latent"].shape == (3, 4, 4) and set(item["text"]) == {"model_a", "model_b"}
    assert item["text"]["model_a"]["cond"].shape == (2, 3)
    assert cl[3]["caption"] == "" and cl[3]["caption_index"] == 0
    # the wide image's crops differ; the variant picked depends on the epoch
    seen = set()
    for epoch in range(12):
        cl.set_epoch(epoch)
        seen.add(cl[0]["latent"][0].sum().item())
    assert len(seen) > 1
    # split by image, repeats expanded only for train when asked
    train, val = split_indices(3, 0.34, seed=0)
    tr = CachedLatentDataset(lat, indices=train)
    va = CachedLatentDataset(lat, indices=val, repeats=False)
    assert len(va) == 1 and len(tr) == sum(lat.repeats[i] for i in train)
    with pytest.raises(DatasetError, match="lacks"):
        CachedLatentDataset(lat, {"m": build_text_cache(["beta"], lambda c: torch.zeros(len(c), 1), "m", tmp_path)})


def test_split_indices():
    tr, va = split_indices(10, 0.2, seed=5)
    assert (tr, va) == split_indices(10, 0.2, seed=5)
    assert len(va) == 2 and sorted(tr + va) == list(range(10)) and not set(tr) & set(va)
    assert split_indices(10, 0.2, seed=6) != (tr, va) or split_indices(10, 0.2, seed=7) != (tr, va)
    assert [len(x) for x in split_indices(2, 0.01)] == [1, 1]
    assert [len(x) for x in split_indices(3, 0.99)] == [1, 2]
    assert split_indices(1, 0.5) == ([0], [])
    assert split_indices(4, 0.0) == ([0, 1, 2, 3], [])
    with pytest.raises(DatasetError):
        split_indices(4, 1.0)


def test_to_model_pixels():
    x = torch.rand(2, 8, 6, 3)
    y = to_model_pixels(x)
    assert y.shape == (2, 3, 8, 6) and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(y[1, 2, 3, 4], x[1, 3, 4, 2] * 2 - 1)


def test_random_crop_variants_for_train_center_crop_for_val(tmp_path):
    for k in range(3):
        gradient(tmp_path / f"w{k}.png", 96 + 8 * k, 32)
    d = ImageDataset(tmp_path, resolution=32, crop="random", seed=5)
    enc = Encoder()
    train = build_latent_cache(d, enc, "vae", tmp_path / ".c", crop_variants=4, indices=[0, 2])
    assert [len(row) for row in train.files] == [4, 0, 4] and train.boxes[1] == []
    assert len({b[2] for b in train.boxes[0]}) > 1  # the variants are different crops
    val_view = d.with_crop("center")
    assert d.crop == "random" and val_view.entries is d.entries
    val = build_latent_cache(val_view, enc, "vae", tmp_path / ".c", indices=[1])
    assert [len(row) for row in val.files] == [0, 1, 0] and val.boxes[1] == [ImageDataset(
        tmp_path, resolution=32).crop_box(1)]
    assert enc.images == len({(i, b) for i in (0, 2) for b in train.boxes[i]}) + 1  # equal crops share one entry
    tr = CachedLatentDataset(train, indices=[0, 2], seed=5)
    item = tr.at(1, epoch=3)
    assert item["size"] == (112, 32) and item["target"] == (32, 32) and item["crop_box"] in train.boxes[2]
    # the pick is a pure function of (seed, epoch, sample): no state, the same in a resumed run
    again = CachedLatentDataset(train, indices=[0, 2], seed=5)
    assert all(torch.equal(tr.at(k, e)["latent"], again.at(k, e)["latent"]) for k in range(2) for e in range(6))
    assert len({tr.at(0, e)["crop_box"] for e in range(12)}) > 1
    tr.set_epoch(3)
    assert torch.equal(tr[1]["latent"], item["latent"])
    with pytest.raises(DatasetError, match="no entries for image"):
        CachedLatentDataset(train, indices=[1])
    with pytest.raises(DatasetError, match="crop must be"):
        d.with_crop("left")


def test_wide_and_tall_images_go_to_different_buckets(tmp_path):
    img(tmp_path / "wide.png", size=(400, 200))
    img(tmp_path / "tall.png", size=(200, 400))
    d = ImageDataset(tmp_path, resolution=256, bucketing=True)
    (wide, tall) = [e.target for e in sorted(d.entries, key=lambda e: e.path.name, reverse=True)]
    assert wide[0] > wide[1] and tall[1] > tall[0] and wide == tall[::-1]
    assert all(s % 64 == 0 for s in wide) and 0.85 * 256 ** 2 <= wide[0] * wide[1] <= 256 ** 2
    cl = CachedLatentDataset(build_latent_cache(d, Encoder(), "vae", tmp_path / ".c"))
    assert len(set(cl.buckets)) == 2 and {tuple(cl[k]["latent"].shape) for k in range(2)} == {
        (3, wide[1] // 8, wide[0] // 8), (3, tall[1] // 8, tall[0] // 8)}
