"""NVIDIA Xid/SXid events from the kernel log: the catalog that explains a code, and the parser that finds them.

Kernel-log lines are the only place the driver reports Xids, so this package turns them into typed events that
carry nothing but the GPU's PCI id, the code and the catalog's advice (never a pid or process name).
"""
