from tenslora.cli import entry

entry()
