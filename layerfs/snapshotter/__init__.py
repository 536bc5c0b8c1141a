"""containerd's snapshots API over the layerfs store and union filesystem.

``service`` holds the semantics (containerd's overlayfs snapshotter is the
reference), ``records`` the snapshot metadata kept in the store's database,
``mounts`` what each snapshot hands containerd to mount, ``server`` the
gRPC proxy-plugin front end, ``proto`` the wire stubs.
"""
