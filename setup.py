"""What pyproject.toml cannot say: the two C parts. The ``layerfs``
command, built from bin/layerfs.c beside the Python command
(bin/layerfs-py), and the extension ``layerfs.fs._lowlevel``.

setuptools has no way to build a program rather than a Python extension,
so the step that installs scripts (into a wheel, or an editable install)
compiles it among them. With no working C compiler, ``layerfs`` is a copy
of the Python command.
"""

import os
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.install_scripts import install_scripts


class InstallScripts(install_scripts):
    def run(self) -> None:
        super().run()
        out = os.path.join(self.install_dir, "layerfs")
        cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
        try:
            subprocess.run([*cc, "-O2", "-Wall", "-o", out, os.path.join("bin", "layerfs.c")], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.warn(f"bin/layerfs.c not built ({exc}): layerfs is the Python command")
            shutil.copy2(os.path.join(self.install_dir, "layerfs-py"), out)
        self.outfiles.append(out)


setup(
    cmdclass={"install_scripts": InstallScripts},
    # What pyfuse3 cannot do, at libfuse's level (see the file): listings the
    # kernel caches, FALLOCATE, LSEEK's holes, READ and WRITE without Python.
    # Optional: where libfuse3's headers are missing, the daemon goes without.
    ext_modules=[Extension("layerfs.fs._lowlevel", ["layerfs/fs/_lowlevel.c"], libraries=["fuse3"],
                           optional=True)],
)
