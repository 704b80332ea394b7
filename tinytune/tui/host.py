"""Host and GPU figures the UI samples itself, on its own thread, off the training path.

Host: system RAM and CPU (psutil). GPU: utilisation, temperature and power from NVML (the
``pynvml`` module of nvidia-ml-py) when importable, else from ``nvidia-smi`` when it is on PATH, else
nothing — a CPU-only machine says so.
"""

from __future__ import annotations

import shutil
import subprocess

import psutil

GIB = 2**30


class HostSampler:
    def __init__(self) -> None:
        self.nvml = None
        self.smi = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no module, no driver, no GPU: all mean "no NVML"
            self.smi = shutil.which("nvidia-smi")
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def sample(self) -> dict:
        vm = psutil.virtual_memory()
        out = {"ram_used_gib": (vm.total - vm.available) / GIB, "ram_total_gib": vm.total / GIB,
               "cpu_percent": psutil.cpu_percent(None), "cpus": psutil.cpu_count(logical=True)}
        out["gpu"] = self._gpu()
        return out

    def _gpu(self) -> dict | None:
        if self.nvml is not None:
            try:
                h = self.nvml.nvmlDeviceGetHandleByIndex(0)
                return {"util_percent": self.nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                        "temp_c": self.nvml.nvmlDeviceGetTemperature(h, self.nvml.NVML_TEMPERATURE_GPU),
                        "power_w": self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                        "name": _text(self.nvml.nvmlDeviceGetName(h)), "source": "NVML"}
            except Exception:  # noqa: BLE001
                return None
        if self.smi:
            try:
                line = subprocess.run([self.smi, "--query-gpu=utilization.gpu,temperature.gpu,power.draw,name",
                                       "--format=csv,noheader,nounits", "-i", "0"], capture_output=True, text=True,
                                      timeout=5).stdout.strip()
                util, temp, power, name = [x.strip() for x in line.split(",", 3)]
                return {"util_percent": float(util), "temp_c": float(temp), "power_w": _float(power), "name": name,
                        "source": "nvidia-smi"}
            except (OSError, ValueError, subprocess.SubprocessError):
                return None
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
