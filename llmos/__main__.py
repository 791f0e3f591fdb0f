from llmos.cli import main

if __name__ == "__main__":  # not when a spawned child (the trainer process) imports it
    main()
