"""Holding a run folder's lock from another process, as a second mmgen command would find it."""

import contextlib
import subprocess
import sys


@contextlib.contextmanager
def lock_held_elsewhere(folder):
    """While the body runs, another process holds mmgen's lock on `folder` (created if missing); then it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmgen.run_folder import RunFolder; "
                               f"RunFolder({str(folder)!r}).lock(); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
