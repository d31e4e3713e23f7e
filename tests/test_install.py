"""The installed set works together: the engines import side by side in one process."""

import subprocess
import sys


def test_engines_import_together():
    code = (
        "import vlbert, deepspeed, mmdet, mmcv.ops, transformers, mlflow, fsspec, torch;"
        "from mmcv.ops import RoIAlign;"
        "print(torch.__version__, mmdet.__version__, mmcv.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    torch_v, mmdet_v, mmcv_v = out.stdout.split()[-3:]
    assert mmdet_v.startswith("3.") and mmcv_v < "2.2"
