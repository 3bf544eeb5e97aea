"""Calibration and validation sets for docs/results.sh and docs/results_vit.sh, for MNIST and
Fashion-MNIST, all from the training images (the test sets stay for evaluation):
- {name}_calib50k.npy: the first 50 000 (docs/results.sh calibrates on them, unlabelled);
- {name}_val10k.npy (+ _labels): the last 10 000 (50000..60000), which calibration never sees
  (docs/results.sh: `mask.confirm` chooses on the first 5000 and confirms on the other 5000);
- {name}_val.npy (+ _labels): 2000 of those (50000..52000), for docs/results_vit.sh, which
  calibrates on the fixtures' 1024 images (the first 1024 training images).
Usage: python3 docs/val_sets.py MNIST_DIR FMNIST_DIR OUT_DIR"""
import os
import sys

import numpy as np

sys.path.insert(0, "fixtures")
import idx  # noqa: E402  (numpy only: no torch needed here)

for name, d in (("mnist", sys.argv[1]), ("fmnist", sys.argv[2])):
    x, y = idx.load_dataset(d)["train"]
    out = lambda f: os.path.join(sys.argv[3], f"{name}_{f}.npy")  # noqa: E731
    np.save(out("calib50k"), x[:50000])
    np.save(out("val10k"), x[50000:60000])
    np.save(out("val10k_labels"), y[50000:60000])
    np.save(out("val"), x[50000:52000])
    np.save(out("val_labels"), y[50000:52000])
