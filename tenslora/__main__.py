from tenslora.cli import main

main()
