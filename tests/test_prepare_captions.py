"""vlbert-prepare-captions (vlbert/cli/prepare_captions.py): TSV + image folder, and img2dataset shards, to checked shards."""

import io
import json
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from vlbert.cli.prepare_captions import main


def _img(fmt, w=40, h=30):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _read_shard(url):
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture
def cc(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = [
        "a dog on a beach\thttp://x/0.jpg",  # caption, url
        "https://x/1.png\ta cat in a hat",  # url, caption
        "missing image\thttp://x/2.jpg",
        "corrupt image\thttp://x/3.jpg",
        "   \thttp://x/4.jpg",  # empty caption
        "only one column",
        "a gif\thttp://x/6.gif",
        "truncated\thttp://x/7.jpg",
    ]
    (tmp_path / "cc.tsv").write_text("\n".join(rows) + "\n")
    (images / "000000000.jpg").write_bytes(_img("JPEG"))
    (images / "000000001.jpg").write_bytes(_img("PNG", 50, 20))  # PNG bytes under .jpg: kept as png
    (images / "000000003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (images / "000000004.jpg").write_bytes(_img("JPEG"))
    (images / "000000006.jpg").write_bytes(_img("GIF"))
    (images / "000000007.jpg").write_bytes(_img("JPEG", 200, 100)[:900])
    return tmp_path


def test_tsv_to_shards(cc):
    out = f"memory://prep-{uuid.uuid4().hex}"
    res = main(["--tsv", str(cc / "cc.tsv"), "--image-dir", str(cc / "images"), "--out", out,
                "--rows-per-shard", "2", "--prefix", "train-", "--workers", "2"])
    assert res["counts"] == {"written": 3, "missing_image": 1, "corrupt_image": 2, "empty_caption": 1, "bad_row": 1}
    assert res["shards"] == [f"{out}/train-00000.tar", f"{out}/train-00001.tar"]
    first = _read_shard(res["shards"][0])
    assert sorted(first) == ["000000000.jpg", "000000000.json", "000000000.txt",
                             "000000001.json", "000000001.png", "000000001.txt"]
    assert first["000000001.txt"] == b"a cat in a hat"
    meta = json.loads(first["000000001.json"])
    assert (meta["width"], meta["height"], meta["url"]) == (50, 20, "https://x/1.png")
    second = _read_shard(res["shards"][1])
    assert Image.open(io.BytesIO(second["000000006.jpg"])).format == "JPEG"  # GIF re-encoded
    with fsspec.open(f"{out}/train-stats.json") as f:
        assert json.load(f)["counts"]["written"] == 3


def test_image_name_by_hash(cc, tmp_path):
    import hashlib

    (cc / "images" / (hashlib.sha1(b"http://x/2.jpg").hexdigest() + ".jpg")).write_bytes(_img("JPEG"))
    res = main(["--tsv", str(cc / "cc.tsv"), "--image-dir", str(cc / "images"), "--image-name", "{sha1}.jpg",
                "--validate-only", "--limit", "4"])
    assert res["counts"] == {"valid": 1, "missing_image": 3}


def test_img2dataset_shards_reshard_and_validate(cc, tmp_path):
    src = tmp_path / "src"
    main(["--tsv", str(cc / "cc.tsv"), "--image-dir", str(cc / "images"), "--out", str(src), "--rows-per-shard", "2"])
    with tarfile.open(src / "00002.tar", "w") as tar:  # a shard with a bad and an incomplete sample
        for name, data in [("bad.jpg", b"nope"), ("bad.txt", b"x"), ("nocap.jpg", _img("JPEG"))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = main(["--shards", str(src / "{00000..00002}.tar"), "--validate-only"])
    assert res["counts"] == {"valid": 3, "corrupt_image": 1, "missing_caption": 1} and res["shards"] == []
    out = f"memory://reshard-{uuid.uuid4().hex}"
    res = main(["--shards", str(src / "*.tar"), "--out", out, "--rows-per-shard", "10"])
    assert res["counts"]["written"] == 3 and len(res["shards"]) == 1
    files = _read_shard(res["shards"][0])
    assert {n.split(".")[0] for n in files} == {"000000000", "000000001", "000000006"}
    assert json.loads(files["000000000.json"])["width"] == 40


def test_arguments_checked(cc):
    with pytest.raises(SystemExit):
        main(["--tsv", str(cc / "cc.tsv"), "--out", "memory://x"])  # no --image-dir
    with pytest.raises(SystemExit):
        main(["--shards", str(cc / "nothing-*.tar"), "--validate-only"])
