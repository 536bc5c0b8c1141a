"""The FUSE union filesystem: an image's layers plus a copy-on-write upper.

Modules, bottom up:

* ``index``  -- the read-only merged index of an image's layers (slots,
  inode numbers, children), built once and cached per image id;
* ``upper``  -- the upper dir in kernel overlayfs format (whiteouts,
  opaque dirs, copy-up through a work dir);
* ``inodes`` -- lookup counts and the per-inode state over the index;
* ``union``  -- overlayfs semantics: lookup, readdir, copy-up, create,
  unlink, rename, setattr, xattrs, reads with digest checks;
* ``ops``    -- the thin pyfuse3.Operations adapter (one error decorator);
* ``mount``  -- the daemon's life: ``mount_image`` (the API the CLI,
  runtime and builder use), and the owner a mount may die with;
* ``registry`` -- the mount records: ``unmount``, ``list_mounts``, the
  clean-up of mounts whose daemon died;
* ``helper`` -- mounts for a busy owner (a build), forked from a clean
  forkserver.
"""
