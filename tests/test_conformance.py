"""Every built-in backend passes the conformance kit that third-party backends run (snapfw.testing)."""

from __future__ import annotations

import pytest

from snapfw.testing import BackendConformance, MemoryBackendConformance, make_image


class TestQcow2(BackendConformance):
    @pytest.fixture
    def snapfw_backend(self):
        return "qcow2"


class TestExternal(BackendConformance):
    @pytest.fixture
    def snapfw_backend(self):
        return "external"

    @pytest.fixture
    def snapfw_disk(self):
        """vda qcow2, vdb raw: frozen files of both formats under the overlays."""
        return lambda folder, name, size: make_image(folder, name, size, "raw" if name.endswith("vdb") else "qcow2")


class TestQemuMemory(MemoryBackendConformance):
    @pytest.fixture
    def snapfw_memory_backend(self):
        return "qemu"


class TestLibvirtMemory(MemoryBackendConformance):
    @pytest.fixture
    def snapfw_memory_backend(self):
        return "libvirt"
