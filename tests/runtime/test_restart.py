"""A container stopped and started again keeps working on its upper dir.

Issue 9: after a restart the upper dir already holds directories that the
image has too (/usr, /etc ...); deleting, renaming, chmod-ing or creating
in their untouched subdirectories failed with ENOTEMPTY, and directory
metadata could be replaced by the image's. Here the real CLI runs a
container (`run -d`), stops and starts it twice, changes untouched
directories in between and commits the result.
"""

from __future__ import annotations

import pytest

from tests.runtime.cli_helpers import Cli, cli_skip_reason, wait_for_log

pytestmark = [pytest.mark.root, pytest.mark.fuse,
              pytest.mark.skipif(cli_skip_reason() is not None, reason=cli_skip_reason() or "")]

# PID 1 writes under several image directories at every start, then waits.
START = ("echo run >> /usr/bin/added; echo run >> /etc/runs; mkdir -p /var/log/app; "
         "chmod 700 /usr; chown 5:6 /var; echo ready; trap 'exit 0' TERM; while :; do sleep 0.1; done")

# In directories the container never touched (their parents are in the upper).
CHANGES = ("set -e; rm /usr/sbin/arping; mv /usr/sbin/brctl /usr/sbin/brctl2; chmod 600 /etc/group; "
           "touch /usr/sbin/new; mkdir /usr/sbin/newdir; ln -s busybox /bin/sym; ln /etc/os-release /etc/os-release2; "
           "echo appended >> /etc/os-release; rmdir /var/tmp; mkdir /var/log/app/sub; rm /sbin/arp")

CHECK = ("set -e; cat /usr/bin/added; test ! -e /usr/sbin/arping; test -L /usr/sbin/brctl2; "
         "test ! -e /usr/sbin/brctl; stat -c '%a %u:%g' /usr /var /etc/group; test -f /usr/sbin/new; "
         "test -d /usr/sbin/newdir; readlink /bin/sym; stat -c %h /etc/os-release; tail -1 /etc/os-release2; "
         "test ! -e /var/tmp; test -d /var/log/app/sub; test ! -e /sbin/arp")


def test_restarted_container_changes_untouched_dirs_and_commits(cli: Cli) -> None:
    cli.out("run", "-d", "--name", "keep", "busybox", "sh", "-c", START)
    try:
        wait_for_log(cli, "keep", "ready")
        cli.out("stop", "-t", "10", "keep")
        cli.out("start", "keep")
        wait_for_log(cli, "keep", "ready\nready\n")
        proc = cli("exec", "keep", "sh", "-c", CHANGES)
        assert proc.returncode == 0, proc.stderr.decode()
        cli.out("stop", "-t", "10", "keep")
        cli.out("start", "keep")
        wait_for_log(cli, "keep", "ready\nready\nready\n")
        expected = ["run", "run", "run", "700 0:0", "755 5:6", "600 0:0", "busybox", "2", "appended"]
        assert cli.out("exec", "keep", "sh", "-c", CHECK).splitlines() == expected
        cli.out("stop", "-t", "10", "keep")
        diff = cli.out("diff", "keep").splitlines()
        for line in ("D /usr/sbin/arping", "A /usr/sbin/brctl2", "D /usr/sbin/brctl", "C /etc/group",
                     "A /usr/sbin/new", "A /usr/sbin/newdir", "A /bin/sym", "A /etc/os-release2",
                     "C /etc/os-release", "D /var/tmp", "A /var/log/app/sub", "D /sbin/arp", "C /usr"):
            assert line in diff, (line, diff)
        cli.out("commit", "keep", "restarted:1")
        out = cli.out("run", "--rm", "restarted:1", "sh", "-c", CHECK)
        assert out.splitlines() == expected
    finally:
        cli("rm", "-f", "keep")
