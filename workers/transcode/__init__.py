"""The transcode job: the ffmpeg command per encode path (`command`) and one attempt (`job`)."""
