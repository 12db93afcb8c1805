"""pflower from Python: run a job from a script or a notebook and get its results back.

    import pflower

    results = pflower.run("strategy=ditto num_rounds=5")             # in this process
    results = pflower.run(["strategy=ditto", "num_rounds=5"], backend="flwr")   # `flwr run`
    results["final_accuracy"], results["rounds"][-1], results["output_dir"]

docs/python_api.md says what each piece is.
"""

from pflower.api import BACKENDS, RunError, config, overrides_of, run

__all__ = ["BACKENDS", "RunError", "config", "overrides_of", "run"]
