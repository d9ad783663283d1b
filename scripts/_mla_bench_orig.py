"""Scratch: the kernel bench with the original launcher patched in (deleted after use)."""
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
import _mla_orig as orig  # noqa: E402
import moecluster.kernels.mla_decode as m  # noqa: E402
m.mla_decode = orig.mla_decode
from moecluster.cluster.cli import main  # noqa: E402
sys.exit(main(["bench", "kernels", "--only", "mla", "--out", sys.argv[1]]))
