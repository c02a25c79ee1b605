"""What podman's config.json asks of nsrun beyond the plain spec (issue 16), one runtime behaviour
per test, on a bundle driven as conmon drives it. tests/oci/test_podman.py runs real podman."""

from __future__ import annotations

import os

import pytest

from tests.oci.test_nsrun import Bundle

pytestmark = pytest.mark.privileged


def test_a_tmpfs_with_tmpcopyup_starts_with_what_the_image_had_there(bundle: Bundle) -> None:
    """podman's --read-only and --tmpfs mounts say tmpcopyup (a runc extension): the tmpfs starts
    as a copy of the directory it covers, and what is written there never reaches the image."""
    data = bundle.rootfs / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "file").write_text("from the image\n")
    (data / "link").symlink_to("sub/file")
    os.chown(data / "sub" / "file", 1000, 1000)
    os.chmod(data / "sub", 0o710)
    os.chmod(data, 0o751)
    bundle.spec["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                                  "options": ["rw", "rprivate", "nosuid", "nodev", "tmpcopyup"]})
    bundle.spec["process"]["args"] = [
        "sh", "-c", "grep -c ' /data tmpfs ' /proc/mounts; cat /data/link; readlink /data/link; "
        "stat -c '%a %u' /data /data/sub /data/sub/file; echo new > /data/new; cat /data/new"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "cu")
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines() == ["1", "from the image", "sub/file", "751 0", "710 0", "644 1000", "new"]
    assert sorted(os.listdir(data)) == ["link", "sub"], "the writes went to the tmpfs"


def test_a_read_only_tmpfs_with_tmpcopyup_is_filled_then_made_read_only(bundle: Bundle) -> None:
    (bundle.rootfs / "data").mkdir()
    (bundle.rootfs / "data" / "file").write_text("kept\n")
    bundle.spec["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                                  "options": ["ro", "tmpcopyup", "size=1m"]})
    bundle.spec["process"]["args"] = ["sh", "-c", "cat /data/file; touch /data/x 2>/dev/null || echo ro"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "cu")
    assert (p.returncode, p.stdout) == (0, "kept\nro\n")


def test_tmpcopyup_is_refused_on_anything_but_a_tmpfs(bundle: Bundle) -> None:
    bundle.spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(bundle.rootfs / "tmp"),
                                  "options": ["rbind", "tmpcopyup"]})
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, 'nsrun: mounts[6].options[1]: "tmpcopyup" only applies to a tmpfs\n')
