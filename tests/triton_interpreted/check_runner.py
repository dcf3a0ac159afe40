"""What both interpreted checks do around their cases: run each check, time it, collect the
failures with their tracebacks, and refuse to run without the Triton interpreter."""
import os
import sys
import time
import traceback


def interpreter_missing():
    """An exit status and a message when TRITON_INTERPRET=1 is not set, else None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    print("set TRITON_INTERPRET=1: this check runs the Triton kernels on CPU tensors", file=sys.stderr)
    return 2


def run_checks(checks, verbose=True, name_width=40):
    """Runs every (name, callable) check; returns the list of (name, error text) failures."""
    failures = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            check()
            status = "ok"
        except Exception:
            failures.append((name, traceback.format_exc()))
            status = "FAIL"
        if verbose:
            print(f"{status:4} {name:{name_width}} {time.perf_counter() - start:6.2f} s", flush=True)
    return failures


def report(failures):
    for name, text in failures:
        print(f"\n=== {name} ===\n{text}", file=sys.stderr)
