from racebench.cli import main

main()
