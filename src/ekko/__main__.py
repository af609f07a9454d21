from ekko.cli import app

app()
