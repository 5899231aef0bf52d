"""The virtual lab: an emulated host (L1) with KVM, a VT-d IOMMU with interrupt remapping and
VFIO, all under TCG, in which the harness runs a scenario that assigns a PCI device to a guest.

L1 boots Debian's generic kernel (recipe ``guest-images/lab-host``) and uses this machine's own
root filesystem, read-only over 9p under a tmpfs overlay: QEMU, Python and the harness inside
L1 are the very ones outside, so nothing has to be packed or kept in step.  The run folder is
shared writable; the inner ``harness run`` writes its reports, logs and traces straight into it.
"""
