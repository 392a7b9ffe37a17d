"""One module per `mixtrt` command (see mixtrt.cli.registry)."""
