"""The wire between processes: frames, the channel, the messages. Standard library only."""
