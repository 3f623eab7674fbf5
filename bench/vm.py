"""Run a benchmark inside a virtual machine, where this host's limits do not apply.

Why: 100,000 connections in one process need 100,000 descriptors, and some hosts (containers,
sandboxes) cap ``RLIMIT_NOFILE`` below that without the right to raise it (``CAP_SYS_RESOURCE``).
Inside a guest the benchmark is root of its own kernel and raises the limit itself.

How: QEMU boots Debian's kernel with a small initramfs (busybox) that mounts *this host's* root
file system over 9p (so the guest runs this checkout, its ``.venv`` and ``redis-server`` as they
are here), gives the guest its own ``/tmp``, then runs the command and powers off. Results the
command writes under the checkout land on the host. ``--accel kvm`` uses KVM where the host
offers it for a normal kernel (not here: this host's KVM is ``kvm_pvm``, which boots only
PVM-built kernels; a normal one stops at "Booting from ROM"); by default QEMU emulates the CPU
(TCG), which is what this repository's 100,000-connection figures were measured with: **memory
per connection and correctness are the guest's own, but times are the emulator's** (10-20x
slower than the host); docs/benchmarks.md compares them only with runs at other sizes in the
same guest. At 100,000 connections give the gateway ``--ping-interval=600``
(``--gateway-arg``): an emulated CPU cannot keep up with 5,000 pings a second.

    python -m bench.vm -- .venv/bin/python -m bench.density --clients 100000 \
        --idle-seconds 0 --gateway-arg=--ping-interval=600 --json out.json
    python -m bench.vm --memory 14G --cpus 2 -- sh -c 'uname -a; ulimit -Hn'

Needs root (apt): installs ``qemu-system-x86`` if missing, and downloads the pinned kernel and
busybox packages into ``~/.cache/eventbus-vm`` once.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eventbus-vm"

#: Debian 12 packages, pinned: the kernel the guest boots and the busybox of its initramfs.
KERNEL_PACKAGE = "linux-image-6.1.0-57-amd64"
KERNEL_VERSION = "6.1.0-57-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Kernel modules (Debian builds them as modules) the initramfs loads to mount the host over 9p.
MODULES = [
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
]

# The guest's /init. Modules load in rounds: insmod has no dependency resolution, and a module
# whose dependencies are not loaded yet fails until a later round. The command comes from a
# file on the host (/work/... is the host's own path inside the guest), so it needs no quoting
# on the kernel command line.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for round in 1 2 3 4; do
  for m in {modules}; do grep -q "^$m " /proc/modules || insmod /mods/$m.ko 2>/dev/null; done
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose host /newroot \\
  || {{ echo "bench.vm: cannot mount the host's root"; poweroff -f; }}
for fs in proc sys dev; do mount -o bind /$fs /newroot/$fs; done
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs tmp /newroot/tmp; mount -t tmpfs run /newroot/run
script=$(sed -n 's/.* script=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
echo "bench.vm: guest up"
chroot /newroot /bin/sh "$script"
echo "bench.vm: exit status $?"
poweroff -f
"""

# What the guest runs, as root of its own kernel: the limits a 100,000-connection benchmark
# needs, then the command in this checkout.
GUEST_SCRIPT = """ip link set lo up
sysctl -qw net.ipv4.ip_local_port_range="20000 65000" net.core.somaxconn=65535
ulimit -Hn 1048576; ulimit -n 1048576
cd {cwd}
{command}
"""


def _apt_download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=into, check=True)
        found = sorted(into.glob(f"{package}_*.deb"))
    return found[-1]


def prepare() -> tuple[Path, Path]:
    """The kernel image and the initramfs, built once into :data:`CACHE`."""
    if shutil.which("qemu-system-x86_64") is None:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"], check=True
        )
    kernel = CACHE / "root" / "boot" / f"vmlinuz-{KERNEL_VERSION}"
    initrd = CACHE / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    debs = CACHE / "debs"
    subprocess.run(
        ["dpkg-deb", "-x", _apt_download(KERNEL_PACKAGE, debs), CACHE / "root"], check=True
    )
    subprocess.run(
        ["dpkg-deb", "-x", _apt_download(BUSYBOX_PACKAGE, debs), CACHE / "busybox"], check=True
    )

    tree = CACHE / "initrd"
    shutil.rmtree(tree, ignore_errors=True)
    for name in ("bin", "dev", "proc", "sys", "newroot", "mods"):
        (tree / name).mkdir(parents=True)
    shutil.copy(CACHE / "busybox" / "bin" / "busybox", tree / "bin" / "busybox")
    modules = CACHE / "root" / "lib" / "modules" / KERNEL_VERSION
    for name in MODULES:
        (found,) = modules.rglob(f"{name}.ko")
        shutil.copy(found, tree / "mods" / found.name)
    (tree / "init").write_text(INIT.format(modules=" ".join(MODULES)))
    (tree / "init").chmod(0o755)
    listing = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    # The busybox just extracted has cpio (hosts often have no cpio of their own).
    archive = subprocess.run(
        [str(tree / "bin" / "busybox"), "cpio", "-o", "-H", "newc"],
        cwd=tree, input=listing, capture_output=True, check=True,
    ).stdout  # fmt: skip
    initrd.write_bytes(gzip.compress(archive, compresslevel=1))
    return kernel, initrd


def accel_works(accel: str) -> bool:
    return accel == "tcg" or os.access("/dev/kvm", os.R_OK | os.W_OK)


def run(command: list[str], *, memory: str, cpus: int, accel: str) -> int:
    """Boot the guest, run ``command`` in this checkout as root, stream its output; its exit
    status is printed by the guest (QEMU's own is returned)."""
    kernel, initrd = prepare()
    script = CACHE / "guest.sh"
    script.write_text(GUEST_SCRIPT.format(cwd=shlex.quote(os.getcwd()),
                                          command=shlex.join(command)))  # fmt: skip
    accel_arg = "kvm" if accel == "kvm" else "tcg,thread=multi,tb-size=1024"
    qemu = [
        "qemu-system-x86_64", "-accel", accel_arg, "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(cpus), "-m", memory, "-nographic", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet script={script}",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,id=host,multidevs=remap",
    ]  # fmt: skip
    return subprocess.run(qemu, stdin=subprocess.DEVNULL).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--memory", default="14G", help="guest memory (default 14G)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="guest CPUs")
    parser.add_argument(
        "--accel",
        choices=["tcg", "kvm"],
        default="tcg",
        help="tcg (emulated, works anywhere) or kvm (needs a usable /dev/kvm)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run in the guest after --")
    if not accel_works(args.accel):
        parser.error(f"--accel {args.accel}: /dev/kvm is not usable here")
    return run(command, memory=args.memory, cpus=args.cpus, accel=args.accel)


if __name__ == "__main__":
    sys.exit(main())
