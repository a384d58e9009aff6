from .commands.cli import program

program()
