"""Layer 4: the cow overlay mounted for real (FUSE), guests sharing unified files.

The overlay's decisions (copy-up, attribution, name operations) are tested in-process in
t3_cow_api; here what needs the kernel and the daemon: page cache, invalidation,
direct_io, the control socket, ENOSPC, a killed writer, umount."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, flags, inode
from cow import control
from vsstore.config import Paths
from vsstore.errors import EXIT_BUSY
from vsstore.window import unsealed

SHARED = b"shared library content " * 100


def mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - fuse.vscow " in line]


@contextmanager
def mounted(host, shared: bytes = SHARED) -> Iterator[Path]:
    """Guests a and b sharing usr/lib/libx.so (unified), mounted at host.base/mnt."""
    for g in "ab":
        host.guest(g, {"usr/lib/libx.so": shared, f"usr/own-{g}": b"own " * 10})
    host.vsunify("run", "--all", "--no-default-excludes")
    mnt = host.base / "mnt"
    mnt.mkdir()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cow.cli",
            "mount",
            "--at",
            str(mnt),
            "--log",
            str(host.base / "cow.log"),
            "a",
            "b",
        ],
        cwd=REPO,
        env={**os.environ, **host.env},
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    try:
        yield mnt
    finally:
        if str(mnt) in mounts():
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        for _ in range(100):
            if str(mnt) not in mounts():
                break
            time.sleep(0.05)


@pytest.fixture
def cow(host):
    with mounted(host) as mnt:
        yield mnt


def vscow(host, *args: str) -> subprocess.CompletedProcess[str]:
    """``vscow ARGS`` with the test host's paths; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "cow.cli", *args],
        cwd=REPO,
        env={**os.environ, **host.env},
        capture_output=True,
        text=True,
    )


def _in_new_pidns(cow, host, guest: str, script: str) -> subprocess.Popen:
    """A busybox shell in a pid namespace of its own, chrooted into ``guest``'s subtree of
    the overlay; it waits for a line on stdin before running ``script``."""
    shutil.copy("/bin/busybox", host.root / guest / "busybox")
    return subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "chroot",
            str(cow / guest),
            "/busybox",
            "sh",
            "-c",
            f"read go; {script}",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def attach_children_ns(cow, name: str, p: subprocess.Popen) -> None:
    """Attach the pid namespace that ``unshare --pid --fork`` (process ``p``) made for
    its child, once it has made it.  If ``p`` ended first, the failure says why (its
    stderr): CI saw it gone once, without a word."""
    own = os.stat("/proc/self/ns/pid").st_ino
    path = f"/proc/{p.pid}/ns/pid_for_children"
    end = time.monotonic() + 30
    fd = -1
    while fd < 0:
        try:
            fd = os.open(path, os.O_RDONLY)
            if os.fstat(fd).st_ino == own:  # not made yet
                os.close(fd)
                fd = -1
        except FileNotFoundError:
            pass
        if fd < 0:
            if p.poll() is not None or time.monotonic() > end:
                p.kill()
                _, err = p.communicate(timeout=30)
                raise AssertionError(f"unshare ended ({p.returncode}) before its namespace: {err}")
            time.sleep(0.01)
    try:
        control.attach(Paths.from_env(), str(cow), name, fd)
    finally:
        os.close(fd)


def test_a_writer_is_told_apart_by_its_attached_pid_namespace(cow, host):
    """End to end: the namespace attached over the control socket, the pid as the kernel
    reports it for a chrooted process in that namespace (the rest: t3_cow_api)."""
    p = _in_new_pidns(cow, host, "b", "echo from-b >> /usr/lib/libx.so")
    try:
        attach_children_ns(cow, "b", p)
        _, err = p.communicate("go\n", timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED + b"from-b\n"
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED


def test_ordinary_posix_operations_and_their_errors(cow):
    d = cow / "a/work"
    d.mkdir()
    (d / "f").write_bytes(b"hello")
    fd = os.open(d / "f", os.O_RDONLY | os.O_NOFOLLOW)  # as tar and rsync open files
    assert os.read(fd, 5) == b"hello"
    os.close(fd)
    fd = os.open(d / "anon", os.O_CREAT | os.O_RDWR, 0o600)  # apt's unlinked temp files
    os.unlink(d / "anon")
    os.write(fd, b"abc")
    assert os.fstat(fd).st_size == 3 and os.fstat(fd).st_nlink == 0
    os.close(fd)
    with open(d / "f", "r+b") as f:
        f.seek(2)
        f.write(b"LL")
    assert (d / "f").read_bytes() == b"heLLo"
    os.symlink("f", d / "link")
    assert os.readlink(d / "link") == "f" and (d / "link").read_bytes() == b"heLLo"
    os.link(d / "f", d / "hard")
    assert os.stat(d / "hard").st_nlink == 2
    os.rename(d / "f", d / "g")
    os.mkfifo(d / "fifo")
    assert sorted(os.listdir(d)) == ["fifo", "g", "hard", "link"]
    with pytest.raises(FileExistsError):
        os.open(d / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(OSError) as e:
        os.rmdir(d)
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        os.stat(d / "nope")
    with pytest.raises(OSError) as e:
        os.rename(d / "g", cow / "b/g")
    assert e.value.errno == errno.EXDEV
    for n in ("g", "hard", "link", "fifo"):
        os.unlink(d / n)
    os.rmdir(d)
    assert not d.exists()
    assert os.statvfs(cow / "a").f_blocks > 0


def _write_as_nobody(path: Path) -> None:
    """A byte written to ``path`` by uid and gid 65534 (pjdfstest's ``-u 65534 -g 65534``),
    through a descriptor opened here (the test's directories are root's alone)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import os; os.setgid(65534); os.setuid(65534); os.write({fd}, b'x')",
            ],
            pass_fds=(fd,),
            check=True,
        )
    finally:
        os.close(fd)


def test_sockets_device_nodes_fifo_links_and_modes_as_posix_has_them(cow, host):
    """What pjdfstest found (issue 17): bind refused, devices refused, a fifo's link
    ESTALE, the daemon's umask applied, set-id bits lost on create."""
    d, back = cow / "a/posix", host.root / "a/posix"
    d.mkdir()
    os.chmod(d, 0o777)
    old = os.umask(0)
    try:
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind(str(d / "sock"))
            srv.listen(1)
            with socket.socket(socket.AF_UNIX) as cli:
                cli.connect(str(d / "sock"))
        assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
        os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(d / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        assert os.lstat(d / "null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.lstat(back / "loop").st_mode)
        # without CAP_MKNOD (as every guest) the kernel refuses a device node before cow
        p = subprocess.run(
            ["setpriv", "--bounding-set", "-mknod", "mknod", str(d / "dev"), "c", "1", "3"],
            capture_output=True,
            text=True,
        )
        assert p.returncode != 0 and "not permitted" in p.stderr
        assert not os.path.lexists(back / "dev")
        os.mkfifo(d / "fifo", 0o620)
        os.link(d / "fifo", d / "fifo2")
        assert os.lstat(d / "fifo").st_nlink == 2
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o620)
        os.close(fd)
        fd = os.open(d / "suid", os.O_CREAT | os.O_WRONLY, 0o4777)
        os.close(fd)
    finally:
        os.umask(old)
    for name, mode in (("fifo", 0o620), ("f", 0o620), ("suid", 0o4777)):
        assert stat.S_IMODE(os.lstat(d / name).st_mode) == mode, name
        assert stat.S_IMODE(os.lstat(back / name).st_mode) == mode, name
    # a write by someone else clears setuid (Linux); chmod sets what it is asked
    _write_as_nobody(d / "suid")
    assert stat.S_IMODE(os.lstat(d / "suid").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(back / "suid").st_mode) == 0o777
    os.chmod(d / "suid", 0o6755)
    assert stat.S_IMODE(os.lstat(back / "suid").st_mode) == 0o6755


def test_umount_leaves_nothing_behind(cow, host):
    assert str(cow) in mounts()
    p = vscow(host, "status")
    assert p.returncode == 0, p.stderr
    assert f"{cow}\tpid " in p.stdout and "guests: a b" in p.stdout
    p = vscow(host, "umount", str(cow))
    assert p.returncode == 0, p.stderr
    assert str(cow) not in mounts()
    assert not subprocess.run(["pgrep", "-f", f"serve.*{cow}"]).returncode == 0
    assert not list((host.base / "run" / "vscow").iterdir())  # no state, no socket
    log = (host.base / "cow.log").read_text()
    assert f"mounted at {cow}" in log and f"unmounted {cow}" in log


def test_the_daemon_logs_to_the_log_directory_by_default(host):
    host.guest("a", {"f": b"x"})
    mnt = host.base / "mnt"
    mnt.mkdir()
    env = {**os.environ, **host.env}
    subprocess.run(
        [sys.executable, "-m", "cow.cli", "mount", "--at", str(mnt), "a"],
        cwd=REPO,
        env=env,
        check=True,
    )
    try:
        assert (mnt / "a/f").read_bytes() == b"x"
    finally:
        subprocess.run(
            [sys.executable, "-m", "cow.cli", "umount", str(mnt)], cwd=REPO, env=env, check=True
        )
    assert f"mounted at {mnt}: a=" in (host.base / "log" / "vscow.log").read_text()


def test_vsunify_refuses_guests_mounted_through_the_overlay(cow, host):
    p = host.vsunify("run", "a", "b", check=False)
    assert p.returncode == EXIT_BUSY and "mounted through the cow overlay" in p.stderr
    assert "vscow umount" in p.stderr and "Traceback" not in p.stderr
    assert host.vsunify("deunify", "a", check=False).returncode == EXIT_BUSY
    assert host.vsunify("run", "--dry-run", "a", "b", check=False).returncode == 0


def test_a_guests_own_hardlinks_stay_one_file_after_copy_up(cow, host):
    a = host.root / "a/usr/lib"
    fd = os.open(a / "libx.so", os.O_RDONLY)
    with unsealed(fd, True):  # a second name in guest a for the shared inode
        os.link(a / "libx.so", a / "libx.so.1")
    os.close(fd)
    os.stat(cow / "a/usr/lib/libx.so.1")  # the overlay learns both names
    with open(cow / "a/usr/lib/libx.so", "ab") as f:
        f.write(b"!")
    assert (cow / "a/usr/lib/libx.so.1").read_bytes() == SHARED + b"!"
    assert inode(a / "libx.so") == inode(a / "libx.so.1")
    assert (cow / "b/usr/lib/libx.so").read_bytes() == SHARED


def _resident(path: Path) -> int:
    """Bytes of ``path``'s inode in the page cache (util-linux fincore: mincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[0])


def test_guests_reading_a_shared_file_cost_about_one_copy_of_page_cache(host):
    big = os.urandom(1 << 20) * 48  # 48 MiB, shared by four guests
    guests = "abcd"
    for g in guests:
        host.guest(g, {"usr/lib/big.so": big})
    host.vsunify("run", "--all", "--no-default-excludes")
    mnt = host.base / "mnt"
    mnt.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "cow.cli", "mount", "--at", str(mnt), *guests],
        cwd=REPO,
        env={**os.environ, **host.env},
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        views = [mnt / g / "usr/lib/big.so" for g in guests]
        for v in views:
            assert v.read_bytes() == big
        # Page cache is per inode: count each distinct inode the guests see once, and the
        # backing inode the daemon reads.  Separate inodes per guest would be 4 + 1 copies.
        distinct = {os.stat(v).st_ino: v for v in views}
        cached = sum(_resident(v) for v in distinct.values()) + _resident(
            host.root / "a/usr/lib/big.so"
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "cow.cli", "umount", str(mnt)],
            cwd=REPO,
            env={**os.environ, **host.env},
            check=False,
        )
    print(f"4 guests reading 48 MiB: {len(distinct)} FUSE inode(s), {cached >> 20} MiB cached")
    assert len(distinct) == 1
    assert cached <= 2 * len(big) + (1 << 20)


def test_random_writes_truncates_and_reads_match_a_model(cow, host):
    """A data-integrity exerciser: a shared file and a private one, hammered with random
    pwrite/truncate/pread through the overlay, checked against an in-memory model."""
    import random

    rnd = random.Random(7)
    models = {cow / "a/usr/lib/libx.so": bytearray(SHARED), cow / "a/new.bin": bytearray()}
    fds = {}
    try:
        for p in models:
            fds[p] = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        for step in range(3000):
            p = rnd.choice(list(models))
            m, fd = models[p], fds[p]
            op = rnd.random()
            if op < 0.5:
                off = rnd.randint(0, len(m) + 5000)
                data = rnd.randbytes(rnd.randint(1, 9000))
                os.pwrite(fd, data, off)
                if off > len(m):
                    m.extend(b"\0" * (off - len(m)))
                m[off : off + len(data)] = data
            elif op < 0.6:
                size = rnd.randint(0, len(m) + 3000)
                os.ftruncate(fd, size)
                del m[size:]
                m.extend(b"\0" * (size - len(m)))
            else:
                off = rnd.randint(0, max(0, len(m) - 1))
                n = rnd.randint(1, 20000)
                assert os.pread(fd, n, off) == bytes(m[off : off + n]), (p, step)
    finally:
        for fd in fds.values():
            os.close(fd)
    for p, m in models.items():
        assert p.read_bytes() == bytes(m)
    assert (cow / "b/usr/lib/libx.so").read_bytes() == SHARED  # never saw any of it


def test_concurrent_writers_in_two_guests_get_two_copies(cow, host):
    import threading

    errors = []

    def writer(g: str) -> None:
        try:
            for i in range(200):
                with open(cow / g / "usr/lib/libx.so", "ab") as f:
                    f.write(f"{g}{i};".encode())
        except OSError as e:
            errors.append((g, i, e))

    ts = [threading.Thread(target=writer, args=(g,)) for g in "ab"]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, (errors, (host.base / "cow.log").read_text()[-3000:])
    for g in "ab":
        tail = "".join(f"{g}{i};" for i in range(200)).encode()
        assert (cow / g / "usr/lib/libx.so").read_bytes() == SHARED + tail
    obj = next(p for p in host.store.rglob("*") if p.is_file())
    assert obj.read_bytes() == SHARED and flags(obj) == "UIa"


def test_rename_noreplace_and_exchange(cow):
    from vsstore import syscalls

    d = cow / "a/r"
    d.mkdir()
    (d / "x").write_bytes(b"x")
    (d / "y").write_bytes(b"y")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            syscalls.renameat2(fd, "x", fd, "y", syscalls.RENAME_NOREPLACE)
        syscalls.renameat2(fd, "x", fd, "y", syscalls.RENAME_EXCHANGE)
    finally:
        os.close(fd)
    assert (d / "x").read_bytes() == b"y" and (d / "y").read_bytes() == b"x"


def test_guests_can_be_added_to_and_removed_from_a_running_overlay(cow, host):
    assert sorted(os.listdir(cow)) == ["a", "b"]  # the kernel caches it: it must follow
    host.guest("c", {"usr/lib/libx.so": SHARED, "etc/hostname": b"c\n"})
    assert vscow(host, "add", str(cow), "c").returncode == 0
    assert sorted(os.listdir(cow)) == ["a", "b", "c"]
    assert (cow / "c/etc/hostname").read_bytes() == b"c\n"
    assert host.vsunify("run", "c", check=False).returncode == EXIT_BUSY  # now served
    p = vscow(host, "add", str(cow), "c")
    assert p.returncode == 3 and "taken" in p.stderr
    assert vscow(host, "remove", str(cow), "c").returncode == 0
    assert sorted(os.listdir(cow)) == ["a", "b"]
    assert not (cow / "c").exists()
    assert host.vsunify("run", "c", check=False).returncode == 0
    p = vscow(host, "remove", str(cow), "nosuch")
    assert p.returncode == 3 and "no guest 'nosuch'" in p.stderr


def test_a_failing_request_never_takes_the_mount_down(cow, host):
    os.rename(host.root / "a", host.root / "a-moved")  # a guest tree vanishes under us
    try:
        assert os.statvfs(cow).f_blocks > 0
        assert os.statvfs(cow / "b").f_blocks > 0
        try:
            os.listdir(cow / "a/usr")
        except OSError:
            pass  # an error for this guest is fine; the mount must stay
        assert str(cow) in mounts()
        assert (cow / "b/usr/lib/libx.so").read_bytes() == SHARED
    finally:
        os.rename(host.root / "a-moved", host.root / "a")


def _eventually(check, seconds: float = 10.0) -> bool:
    """Poll ``check`` until true (a notification travels through a thread of the daemon)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_kernel_caches_follow_a_copy_up_in_every_guest(cow, host):
    a, b = cow / "a/usr/lib/libx.so", cow / "b/usr/lib/libx.so"
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)  # both on the shared inode
    try:
        assert os.fstat(fb).st_nlink == 3  # cached by the kernel for every guest
        with open(a, "ab") as f:  # copy-up by an open for writing
            f.write(b"A")
        assert _eventually(lambda: os.fstat(fb).st_nlink == 2)
        os.chmod(b, 0o600)  # copy-up by a change of metadata
        st = os.fstat(fa)
        assert st.st_mode & 0o777 == 0o644 and st.st_nlink == 1
        assert os.stat(b).st_mode & 0o777 == 0o600
        os.chmod(b, 0o644)
        with open(a, "r+b") as f:  # ftruncate through a handle on a copy
            f.truncate(5)
        assert os.fstat(fb).st_size == len(SHARED)
        assert os.pread(fb, len(SHARED) + 1, 0) == SHARED
    finally:
        os.close(fa)
        os.close(fb)
    assert a.read_bytes() == SHARED[:5] and b.read_bytes() == SHARED
    obj = next(p for p in host.store.rglob("*") if p.is_file())
    assert obj.read_bytes() == SHARED and os.stat(obj).st_nlink == 1


def test_truncate_and_setxattr_by_path_copy_up_and_the_other_guest_sees_no_change(cow, host):
    """truncate(2) and setxattr(2) by path, through the kernel (no handle): each copies up
    the name it names; an open file of the other guest keeps the shared inode's size and
    bytes (the answers are tested in t3_cow_api)."""
    a, b = cow / "a/usr/lib/libx.so", cow / "b/usr/lib/libx.so"
    assert not [x for x in os.listxattr(a) if ".vsstore." in x]  # our marker: hidden
    fb = os.open(b, os.O_RDONLY)  # the shared inode
    try:
        os.truncate(a, 10)
        assert os.stat(a).st_size == 10
        assert os.fstat(fb).st_size == len(SHARED)
        os.setxattr(b, "user.color", b"red")
        assert os.getxattr(b, "user.color") == b"red"
        assert os.pread(fb, len(SHARED) + 1, 0) == SHARED
    finally:
        os.close(fb)
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED[:10]
    assert "user.color" not in os.listxattr(a)
    obj = next(p for p in host.store.rglob("*") if p.is_file())
    assert obj.read_bytes() == SHARED and flags(obj) == "UIa"
    assert "user.color" not in os.listxattr(obj)


@pytest.fixture
def small_host(host):
    """``host`` with its guests and store on a 4 MiB tmpfs (filled up by the test)."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "vsstore-test", str(host.root)], check=True
    )
    try:
        yield host
    finally:
        subprocess.run(["umount", "-l", str(host.root)], check=False)


def test_a_guest_filling_the_disk_gets_enospc_and_the_overlay_goes_on(small_host):
    host = small_host
    big = os.urandom(1 << 20)
    with mounted(host, big) as cow:
        fill = cow / "a/fill"
        with pytest.raises(OSError) as e, open(fill, "wb") as f:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:  # the copy-up does not fit either
            with open(cow / "b/usr/lib/libx.so", "ab") as f:
                f.write(b"!")
        assert e.value.errno == errno.ENOSPC
        b = host.root / "b/usr/lib"
        assert sorted(os.listdir(b)) == ["libx.so"]  # no half copy left behind
        assert (b / "libx.so").read_bytes() == big and flags(b / "libx.so") == "UIa"
        assert (cow / "b/usr/lib/libx.so").read_bytes() == big
        os.unlink(fill)
        with open(cow / "b/usr/lib/libx.so", "ab") as f:
            f.write(b"!")
        assert (b / "libx.so").read_bytes() == big + b"!"
        assert (cow / "a/usr/lib/libx.so").read_bytes() == big


def test_a_writer_killed_mid_write_leaves_the_overlay_and_other_guests_intact(cow, host):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import os, sys
fd = os.open({str(cow / "a/usr/lib/libx.so")!r}, os.O_WRONLY | os.O_APPEND)
print("open", flush=True)
while True:
    os.write(fd, b"w" * 4096)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline() == "open\n"
        time.sleep(0.3)
    finally:
        writer.kill()
        writer.wait()
    data = (host.root / "a/usr/lib/libx.so").read_bytes()
    assert data.startswith(SHARED) and len(data) > len(SHARED)
    assert set(data[len(SHARED) :]) == {ord("w")}
    assert (cow / "a/usr/lib/libx.so").read_bytes() == data
    assert (cow / "b/usr/lib/libx.so").read_bytes() == SHARED
    assert flags(host.root / "b/usr/lib/libx.so") == "UIa"
    assert sorted(os.listdir(host.root / "a/usr/lib")) == ["libx.so"]
    assert str(cow) in mounts()


def test_a_directory_listed_once_is_listed_again_by_the_kernel_alone(cow, host):
    """The kernel's directory cache (FOPEN_CACHE_DIR): a name put into a guest's tree
    beside the overlay, the directory's mtime put back, does not show in the cached listing
    (no request reached the daemon; without the cache it would: the daemon reads the
    directory anew); a change through the overlay invalidates it, and the listing is whole
    again.  (A directory whose mtime changes is read anew at its next listing.)"""
    d, under = cow / "a/usr", host.root / "a/usr"
    first = sorted(os.listdir(d))
    before = os.stat(under)
    (under / "beside").write_bytes(b"made beside the overlay")
    os.utime(under, ns=(before.st_atime_ns, before.st_mtime_ns))  # the kernel sees no change
    assert sorted(os.listdir(d)) == first  # served from the kernel's cache
    (d / "through").write_bytes(b"made through the overlay")
    assert sorted(os.listdir(d)) == sorted([*first, "beside", "through"])


def test_a_symlink_read_once_is_read_again_from_the_kernels_cache(cow, host):
    """FUSE_CAP_CACHE_SYMLINKS: once read, a symlink's target comes from the kernel.  The
    symlink renamed beside the overlay (the same inode, so the same target), the daemon
    could no longer find it (ESTALE), yet reading it through the overlay still works."""
    os.symlink("own-a", host.root / "a/usr/link")
    link = cow / "a/usr/link"
    assert os.readlink(link) == "own-a"
    os.rename(host.root / "a/usr/link", host.root / "a/usr/moved")
    assert os.readlink(link) == "own-a"  # no request reached the daemon


def test_a_new_symlink_never_shows_a_removed_ones_cached_target(cow, host):
    """A guest holds its symlink open (O_PATH), removes it, and makes another under the
    same name: the filesystem gives the new one the old inode number, the kernel still
    holds the old node with its target cached; the new symlink is read as itself."""
    link, under = cow / "a/usr/link", host.root / "a/usr/link"
    os.symlink("own-a", link)
    ino = os.lstat(under).st_ino
    held = os.open(link, os.O_PATH | os.O_NOFOLLOW)
    try:
        assert os.readlink(link) == "own-a"
        for i in range(50):
            os.unlink(link)
            os.symlink(f"lib/{i}", link)
            if os.lstat(under).st_ino == ino:
                break
        assert os.lstat(under).st_ino == ino, "the filesystem gave the number out no more"
        assert os.readlink(link) == f"lib/{i}"
        assert os.readlink("", dir_fd=held) == "own-a"  # the old one, as the kernel holds it
    finally:
        os.close(held)


def test_a_removed_file_held_open_never_reopens_as_the_file_given_its_number(cow, host):
    """A guest holds its file by an O_PATH descriptor and removes it; the filesystem gives
    the number to the next file made.  Reopening the descriptor through /proc/self/fd
    reaches the removed file's node, which opens nothing (ESTALE), never the new file:
    the new one is a node of its own (otherwise any guest on that filesystem could read the
    file that took the number)."""
    usr, under = cow / "a/usr", host.root / "a/usr"
    (usr / "mine").write_bytes(b"mine\n")
    ino = os.lstat(under / "mine").st_ino
    held = os.open(usr / "mine", os.O_PATH)
    try:
        os.unlink(usr / "mine")
        for i in range(50):
            (usr / f"new{i}").write_bytes(b"the new file's secret\n")
            if os.lstat(under / f"new{i}").st_ino == ino:
                break
        assert os.lstat(under / f"new{i}").st_ino == ino, "the number was not given out"
        assert os.stat(usr / f"new{i}").st_ino != os.fstat(held).st_ino
        with pytest.raises(OSError) as e:
            os.open(f"/proc/self/fd/{held}", os.O_RDONLY)
        assert e.value.errno == errno.ESTALE
    finally:
        os.close(held)


def _daemon_pid(cow: Path, host) -> int:
    p = vscow(host, "status")
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith(f"{cow}\tpid "))
    return int(line.split("\t")[1].split()[1])


def test_queued_requests_are_read_at_once_and_a_burst_from_many_threads_is_served(cow, host):
    """Our pyfuse3 (scripts/pyfuse3/read-queued.patch) keeps the FUSE device non-blocking
    and reads a request already queued without waiting for trio's next poll; a read that
    finds none (or that another of its tasks beat to it) waits as before.  Requests from
    many threads at once are all answered, and rightly."""
    pid = _daemon_pid(cow, host)
    dev = [
        fd
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
    ]
    assert dev
    for fd in dev:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = next(int(x.split()[1], 8) for x in f if x.startswith("flags:"))
        assert flags & os.O_NONBLOCK
    want = (cow / "a/usr/lib/libx.so").read_bytes()
    errors: list[str] = []

    def burst(g: str) -> None:
        for i in range(150):
            p = cow / g / f"usr/burst-{threading.get_ident()}-{i}"
            p.write_bytes(b"%d" % i)
            if p.read_bytes() != b"%d" % i or (cow / g / "usr/lib/libx.so").read_bytes() != want:
                errors.append(str(p))
            p.unlink()

    threads = [threading.Thread(target=burst, args=(g,)) for g in "abab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [n for g in "ab" for n in os.listdir(host.root / g / "usr") if "burst" in n]
