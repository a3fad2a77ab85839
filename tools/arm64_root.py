"""A Debian bookworm arm64 root that runs the agent under qemu-user emulation (a Raspberry Pi 4 stand-in).

Setup (downloads; root; apt packages debootstrap, qemu-user-static, binfmt-support):

    python tools/arm64_root.py build            # ~3 min debootstrap + ~30 s pip, cached; re-running is a no-op
    python tools/arm64_root.py status           # ready, or why not (exit 1)
    python tools/arm64_root.py run [--bind DIR]... -- snake-agent run ...   # a command inside the root

``build`` mounts binfmt_misc and enables qemu-aarch64, debootstraps a minbase root with python3,
copies the host's extra CA certificates in, builds this checkout's wheel and installs it with the
``agent-portable`` extra into /opt/snake (aarch64 wheels from the package index) and writes a fake
Pi 4 /proc/cpuinfo. ``run`` needs no network beyond the host's: it enters a private mount namespace,
mounts /proc, /dev and /sys, bind-mounts the fake cpuinfo over /proc/cpuinfo (onnxruntime's CPU
detection crashes on the host's x86 cpuinfo under qemu 7.2) and the ``--bind`` directories at their
own paths, sets ``QEMU_CPU=cortex-a72`` (qemu's default CPU advertises SVE/SME and makes ORT stall)
and execs the command, so its pid is the emulated process. The root shares the host's network.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path(os.environ.get("SNAKE_ARM64_ROOT", Path.home() / ".cache" / "snakelearn" / "arm64-bookworm"))
VENV = "/opt/snake"  # inside the root
BINFMT = Path("/proc/sys/fs/binfmt_misc")
CPUINFO = "etc/snake-cpuinfo"  # inside the root: the fake /proc/cpuinfo
EMULATED_CPU = "cortex-a72"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
APT_NEEDS = {
    "debootstrap": "debootstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "update-binfmts": "binfmt-support",
}

# A Raspberry Pi 4 (BCM2711, 4 x Cortex-A72) as its kernel reports it.
PI4_CPUINFO = (
    "".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
        for i in range(4)
    )
    + "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
)


def log(text: str) -> None:
    print(f"arm64-root: {text}", file=sys.stderr, flush=True)


def sh(*cmd: str, env: dict[str, str] | None = None) -> None:
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, env=env)


def missing_tools() -> list[str]:
    """Debian packages whose commands are missing."""
    return sorted({pkg for tool, pkg in APT_NEEDS.items() if shutil.which(tool) is None})


def binfmt_reason() -> str | None:
    """None if aarch64 binaries run here through qemu, else why not."""
    if os.geteuid() != 0:
        return "needs root (chroot, mounts)"
    if missing := missing_tools():
        return f"missing Debian packages: {' '.join(missing)} (apt-get install {' '.join(missing)})"
    entry = BINFMT / "qemu-aarch64"
    if not entry.is_file():
        return f"binfmt handler {entry} not registered (python tools/arm64_root.py build enables it)"
    if not entry.read_text().startswith("enabled"):
        return f"binfmt handler {entry} is disabled (update-binfmts --enable qemu-aarch64)"
    return None


def root_reason(root: Path) -> str | None:
    """None if ``root`` is a built root that can run agents, else why not."""
    if (reason := binfmt_reason()) is not None:
        return reason
    if not (root / ".snake-ready").is_file():
        return f"no arm64 root at {root} (python tools/arm64_root.py build --root {root})"
    return None


def enable_binfmt() -> None:
    if not (BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT))
    sh("update-binfmts", "--enable", "qemu-aarch64")


def debootstrap(root: Path) -> None:
    if (root / ".snake-debootstrap").is_file():
        return
    if root.exists():
        shutil.rmtree(root)  # a half-built root from an interrupted run
    root.parent.mkdir(parents=True, exist_ok=True)
    sh("debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(root),
       "http://deb.debian.org/debian")  # fmt: skip
    (root / ".snake-debootstrap").touch()


def trust_host_cas(root: Path) -> None:
    """The host's extra CA certificates (e.g. an egress proxy's) into the root, so pip can reach the index."""
    extra = Path("/usr/local/share/ca-certificates")
    target = root / "usr/local/share/ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    for cert in extra.glob("*.crt") if extra.is_dir() else []:
        shutil.copy2(cert, target / cert.name)
    chroot(root, ["update-ca-certificates"], binds=[])


def build_wheel(out: Path) -> Path:
    """This checkout as a wheel (the agent installs the package, not the source tree)."""
    try:  # the build backend already here: no download; else pip fetches setuptools into an isolated build
        import setuptools  # noqa: F401
        import wheel  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(REPO))
    wheels = sorted(out.glob("snakelearn-*.whl"))
    if not wheels:
        raise SystemExit("arm64-root: pip wheel produced no snakelearn wheel")
    return wheels[-1]


def install_agent(root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        wheel = build_wheel(Path(tmp))
        inside = "/" + str(wheel.relative_to(root))
        chroot(root, ["python3", "-m", "venv", VENV], binds=[])
        pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        chroot(root, [*pip, "--force-reinstall", "--no-deps", inside], binds=[])
        chroot(root, [*pip, f"{inside}[agent-portable]"], binds=[])
    chroot(root, [f"{VENV}/bin/snake-agent", "--help"], binds=[])


def build(root: Path) -> None:
    if missing := missing_tools():
        sh("apt-get", "install", "-y", "-qq", *missing, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    enable_binfmt()
    (root / ".snake-ready").unlink(missing_ok=True)
    debootstrap(root)
    (root / CPUINFO).write_text(PI4_CPUINFO)
    trust_host_cas(root)
    install_agent(root)
    (root / ".snake-ready").touch()
    log(f"ready: {root}")


def chroot_command(root: Path, command: list[str], binds: list[Path]) -> list[str]:
    """``command`` in ``root`` in a private mount namespace (mounts vanish with it); the last exec keeps the pid."""
    mounts = [
        f"mount -t proc proc {root}/proc",
        f"mount --rbind /dev {root}/dev",
        f"mount -t sysfs sysfs {root}/sys",
        f"mount --bind {root}/{CPUINFO} {root}/proc/cpuinfo",
    ]
    for path in binds:
        inside = root / str(path).lstrip("/")
        kind = "-d" if path.is_dir() else "-f"
        make = f"mkdir -p {inside}" if path.is_dir() else f"mkdir -p {inside.parent} && touch {inside}"
        mounts.append(f"[ {kind} {inside} ] || {{ {make}; }}; mount --bind {path} {inside}")
    script = " && ".join(mounts) + ' && exec chroot "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, str(root), *command]


def chroot_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k.startswith(("SNAKE_", "PIP_")) or k in ("TERM", "LANG")}
    keep.pop("PIP_FIND_LINKS", None)  # the host's x86 wheel directory
    return {**keep, "QEMU_CPU": EMULATED_CPU, "PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}  # fmt: skip


def chroot(root: Path, command: list[str], binds: list[Path]) -> None:
    log("(arm64) $ " + shlex.join(command))
    subprocess.run(chroot_command(root, command, binds), check=True, env=chroot_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"Root directory (default {DEFAULT_ROOT}).")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="Build (or finish) the root and install the agent wheel in it.")
    sub.add_parser("status", help="Exit 0 if the root can run agents, else print why not.")
    run = sub.add_parser("run", help="Run a command inside the root (after --).")
    run.add_argument("--bind", type=Path, action="append", default=[], help="Host path to mount at the same path.")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    root = args.root.resolve()
    if args.action == "build":
        build(root)
    elif args.action == "status":
        reason = root_reason(root)
        print(reason or f"ready: {root}")
        raise SystemExit(0 if reason is None else 1)
    else:
        if (reason := root_reason(root)) is not None:
            raise SystemExit(f"arm64-root: {reason}")
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        os.execvpe("unshare", chroot_command(root, command, args.bind), chroot_env())


if __name__ == "__main__":
    main()
