"""Running ``python -m repa_fast.generate`` in the test process, for the SiT and DiT tests."""
import os

import numpy as np

from repa_fast.generate import main


def generate(ckpt, sample_dir, *flags):
    """Run the CLI in this process; returns (exit code, the .npz array or None)."""
    rc = main(["--ckpt", ckpt, "--sample-dir", str(sample_dir), *flags])
    npz = [f for f in os.listdir(sample_dir) if f.endswith(".npz")] if rc == 0 else []
    return rc, (np.load(os.path.join(sample_dir, npz[0]))["arr_0"] if npz else None)


def run_folder(sample_dir):
    (name,) = [d for d in os.listdir(sample_dir) if os.path.isdir(os.path.join(sample_dir, d))]
    return os.path.join(sample_dir, name)
