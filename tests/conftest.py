"""Shared pytest fixtures."""

import pytest
import torch

import bnkit.data.fashion_mnist as fm


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory):
    """A folder holding a tiny learnable Fashion-MNIST look-alike (official file names, .gz)."""
    from bnkit.data import make_fake_fashion_mnist

    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Hide every real dataset location: empty HOME, no BNKIT_DATA, missing system folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("BNKIT_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    return tmp_path


@pytest.fixture
def one_thread():
    """torch (and so bnkit's cpu kernels) on one thread during the test; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def python_ops(monkeypatch):
    """Layer calls on the 'cpu' backend take the Python autograd.Function path, not the
    C++ node (as with kernels.use_native(False))."""
    from bnkit import kernels
    monkeypatch.setattr(kernels, "_native", None)


BN_PATHS = ["reference", "cpu-python", "cpu-native"]


@pytest.fixture(params=BN_PATHS)
def bn_path(request, monkeypatch):
    """The test on each path a core call can take: the 'reference' backend, the 'cpu'
    backend's Python path (native node off, as with BNKIT_NATIVE=0) and the native C++
    node; skipped where the path is unavailable. The backend selection is restored after."""
    import bnkit
    from bnkit import kernels
    name = request.param
    if name != "reference" and "cpu" not in bnkit.available_backends():
        pytest.skip("the cpu backend needs the C++ extension bnkit._C")
    before = bnkit.get_backend()
    bnkit.set_backend("reference" if name == "reference" else "cpu")
    if name == "cpu-python":
        monkeypatch.setattr(kernels, "_native", None)
    elif name == "cpu-native" and kernels.native_module() is None:
        bnkit.set_backend(before)
        pytest.skip("native op unavailable")
    yield name
    bnkit.set_backend(before)


@pytest.fixture(scope="session")
def mini_lab(tiny_idx_dir, tmp_path_factory):
    """run(name, seeds=2) -> (config, RunResult): one experiment's mini profile on the tiny
    data set, in this process, on the reference backend (no kernel compilation)."""
    import bnkit
    from bnkit.lab import config, runner

    def run(name: str, seeds: int = 2):
        previous = bnkit.get_backend()
        bnkit.set_backend("reference")
        try:
            cfg = config.resolve([name], "mini", seeds=seeds, data=str(tiny_idx_dir))
            return cfg, runner.run_lab(cfg, tmp_path_factory.mktemp(name) / "run",
                                       progress=False, strict=True)
        finally:
            bnkit.set_backend(previous)
    return run
