"""Mounting images: an image's layers plus a copy-on-write upper, served by
one of two backends behind ``mount.mount_image`` (``backend`` picks them):
the FUSE daemon (the default and the reference) or kernel overlayfs.

Modules, bottom up:

* ``index``  -- the read-only merged index of an image's layers (slots,
  inode numbers, children), built once and cached per image id;
* ``upper``  -- the upper dir in kernel overlayfs format (whiteouts,
  opaque dirs, copy-up through a work dir);
* ``inodes`` -- lookup counts and the per-inode state over the index;
* ``union``  -- overlayfs semantics: lookup, readdir, copy-up, setattr,
  xattrs; with ``names`` (create, link, unlink, rename: whiteouts and
  opaque dirs) and ``files`` (open files, reads with digest checks);
* ``verify`` -- whole-object verification of big objects (mapped under a
  read lease; on every core only in the detached daemon);
* ``ops``    -- the thin pyfuse3.Operations adapter (one error decorator);
* ``lowlevel`` -- with the C module ``_lowlevel``, what pyfuse3 cannot
  do: OPENDIR answered ENOSYS so that the kernel caches listings (READDIR
  given its inode), FALLOCATE passed on to the upper file, LSEEK's
  SEEK_DATA/SEEK_HOLE answered from the file below, READ and WRITE of
  files with nothing left to check answered without Python;
* ``mount``  -- ``mount_image`` (the API the CLI, runtime and builder
  use): resolve the image, pick the backend, hand a forked daemon its job;
* ``daemon`` -- the FUSE daemon process: forked early, serves the union
  until unmount, SIGTERM or its owner's death;
* ``mountproc`` -- what every mount process does, either backend: drop
  inherited fds, watch its owner, clean up after the unmount;
* ``registry`` -- the mount records: ``unmount``, ``list_mounts``, the
  clean-up of mounts whose daemon died;
* ``helper`` -- mounts for a busy owner (a build), forked from a clean
  forkserver;
* ``backend`` -- which backend a mount uses (``--backend``,
  ``$LAYERFS_BACKEND``, ``ROOT/config.json``);
* ``erofs`` -- a writer of metadata-only EROFS images;
* ``metalayer`` -- the kernel backend's metadata layer of an image (EROFS,
  cached per layer chain, overlay xattrs escaped, raw objects ensured);
* ``kernel`` -- overlay mounts through the new mount API, support probe;
* ``kernel_mount`` -- the kernel backend's ``mount_image`` and the keeper
  process of each kernel mount.
"""
