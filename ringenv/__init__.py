"""ringenv: a Gymnasium environment around a simulated arm64 KVM host with per-vCPU dirty rings."""

__version__ = "0.1.0"
