"""tabconv: compile ONNX CNNs into product-quantized table-lookup models, and run them.

Every failure of tabconv itself raises TabconvError with the message the CLI prints after
"error: " (it names the file, node and op). Arguments of the wrong type raise TypeError.
compile, run and eval release the GIL: other Python threads run meanwhile, and one Model can be
run from several threads at once.
"""

import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

PathLike = Union[str, "os.PathLike[str]"]
# a path (.npy float32 NCHW, MNIST-style IDX optionally gzipped, CIFAR .bin) or a float array
Images = Union[PathLike, npt.ArrayLike]
# a path (.npy, IDX, CIFAR .bin) or an integer array
Labels = Union[PathLike, npt.ArrayLike]

class TabconvError(Exception):
    """A bad file, model, option or input; the message is the CLI's."""

def compile(
    onnx_path: PathLike,
    out_path: PathLike,
    calib: Optional[Images] = None,
    val: Optional[Images] = None,
    val_labels: Optional[Labels] = None,
    pipeline: str = "tabconv",
    set: Optional[Union[Mapping[str, Any], Sequence[str]]] = None,
    seed: int = 0,
    emit: str = "tcv",
    verbose: bool = False,
    normalize: Optional[Tuple[float, float]] = None,
    pad: int = 0,
    pad_value: float = 0.0,
) -> dict:
    """Compile an ONNX model into a .tcv, as tabconv-compile does; returns the JSON report of
    `tabconv-compile --report` as a dict.

    pipeline: a built-in pipeline name (tabconv, exact, all-lut) or a pipeline YAML file.
    set: pass options, {"mask.min_logit_cosine": 0.99} or ["mask.min_logit_cosine=0.99"].
    calib: calibration images (pipelines that learn tables need them).
    val, val_labels: labelled validation images (set={"mask.max_accuracy_drop": 0.5}).
    seed: for everything random in the passes (the CLI's --seed).
    emit: "tcv", or "onnx" for standard ONNX (the CLI's --emit).
    verbose: print the CLI's progress lines on stderr as the compile goes.
    normalize=(mean, std), pad=n, pad_value=v: the CLI's --normalize, --pad and --pad-value,
    applied to calib and val.
    The output is written atomically: a failed or interrupted (Ctrl-C, checked between passes,
    layers and masking steps; raises KeyboardInterrupt)
    compile leaves nothing at out_path.
    """

def load(path: PathLike) -> Model:
    """Load a .tcv, or an .onnx with the rewrites ONNX Runtime also makes, to run it."""

class Model:
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def inputs(self) -> list[str]:
        """Input names (run takes the first and only input)."""
    @property
    def outputs(self) -> list[str]:
        """Output names, in the order run_all returns them."""
    @property
    def batch_note(self) -> Optional[str]:
        """The CLI's note when the file fixes the batch size (other sizes run in chunks)."""
    def run(self, x: npt.ArrayLike) -> np.ndarray:
        """Run on a float batch shaped as the model's input (NCHW, any batch size); returns the
        first output (as `tabconv run --output` writes it)."""
    def run_all(self, x: npt.ArrayLike) -> list[np.ndarray]:
        """Run on a batch; returns every output."""
    def eval(
        self,
        x: Images,
        y: Labels,
        batch: int = 64,
        normalize: Optional[Tuple[float, float]] = None,
        pad: int = 0,
        pad_value: float = 0.0,
    ) -> dict:
        """Top-1 accuracy of the first output, as `tabconv eval --json` prints it: model,
        accuracy, correct, samples, batch, seconds, images_per_second."""
