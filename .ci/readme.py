"""Run README's two commands exactly as written, as a new user would (standard library only:
nothing is installed before the first command).

    python3 .ci/readme.py first    # install, then the sandbox: used as its banner says, then Ctrl-C
    python3 .ci/readme.py second   # the test suite

The commands are the first two ``sh`` blocks under "## Try it, and test it", run with
``bash -c`` (root's shell on Debian) from the repository's root. The first one ends by
starting the sandbox, which runs until Ctrl-C: this script waits for its banner, runs the
``curl`` command the banner prints (a real IMAP login through the proxy, whose answer must
be the welcome message), then sends SIGINT to the command's process group, as Ctrl-C on a
terminal does, and requires exit status 0. Anything else (no banner, a failed curl,
another status) fails.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 1500  # seconds for the first command to show the sandbox's banner
BANNER_END = "The proxy's configuration is"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Try it, and test it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    commands = [block.strip() for block in blocks[:2]]
    if len(commands) != 2 or any("\n" in c for c in commands):
        sys.exit("README: expected two one-line sh blocks under '## Try it, and test it'")
    return commands


def run_first(command: str) -> int:
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert process.stdout is not None
    timer = threading.Timer(INSTALL_TIMEOUT, os.killpg, (process.pid, signal.SIGKILL))
    timer.start()
    banner = ""
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            banner += line
            if BANNER_END in line:
                break
        timer.cancel()
        if BANNER_END not in banner:
            status = process.wait()
            print(f"readme.py: the first command ended ({status}) without the sandbox's banner")
            return 1
        curl = next(
            (ln.strip() for ln in banner.splitlines() if ln.strip().startswith("curl ")), ""
        )
        print(f"readme.py: as the banner says: {curl}", flush=True)
        done = subprocess.run(
            shlex.split(curl), capture_output=True, text=True, timeout=60, check=False
        )
        print(done.stdout + done.stderr, flush=True)
        if done.returncode != 0 or "Welcome to the xoauth2-proxy sandbox" not in done.stdout:
            print(f"readme.py: curl through the sandbox failed ({done.returncode})")
            return 1
        print("readme.py: Ctrl-C (SIGINT to the command's process group)", flush=True)
        os.killpg(process.pid, signal.SIGINT)
        for line in process.stdout:
            print(line, end="", flush=True)
        status = process.wait(60)
        if status != 0:
            print(f"readme.py: the sandbox exited {status} after Ctrl-C")
            return 1
        return 0
    finally:
        timer.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


def main() -> int:
    first, second = readme_commands()
    if sys.argv[1:] == ["first"]:
        print(f"readme.py: README's first command: {first}", flush=True)
        return run_first(first)
    if sys.argv[1:] == ["second"]:
        print(f"readme.py: README's second command: {second}", flush=True)
        return subprocess.run(["bash", "-c", second], cwd=ROOT, check=False).returncode
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
