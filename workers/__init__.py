"""What runs inside a worker pod: task bodies, ffmpeg, GPU discovery. Producers never import it."""
