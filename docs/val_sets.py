"""Validation sets for docs/results.sh and docs/results_vit.sh: 2000 training images (50000..52000)
that the calibration set (the first 1024) does not use, for MNIST and Fashion-MNIST.
Usage: python3 docs/val_sets.py MNIST_DIR FMNIST_DIR OUT_DIR"""
import os
import sys

import numpy as np

sys.path.insert(0, "fixtures")
import idx  # noqa: E402  (numpy only: no torch needed here)

for name, d in (("mnist", sys.argv[1]), ("fmnist", sys.argv[2])):
    x, y = idx.load_dataset(d)["train"]
    np.save(os.path.join(sys.argv[3], f"{name}_val.npy"), x[50000:52000])
    np.save(os.path.join(sys.argv[3], f"{name}_val_labels.npy"), y[50000:52000])
