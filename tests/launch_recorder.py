"""Records what a Triton launcher really passes to a kernel: the tests hold the launchers' choices
(tile widths, register caps) to the values they must take, on the path users call."""


def record_launches(monkeypatch, module, kernel_name, pick):
    """Wrap ``module.<kernel_name>`` (``kernel[grid](*args, **kwargs)``) for the test's duration;
    each launch appends ``pick(kwargs)`` to the returned list, then runs the kernel."""
    kernel = getattr(module, kernel_name)
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(pick(kwargs))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel_name, Recorder())
    return seen
