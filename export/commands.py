"""Subcommands of the `mixtrt` CLI. Each imports what it needs when it runs."""

from __future__ import annotations
