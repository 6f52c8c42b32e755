from racebench.cli import app

app(prog_name="racebench")
