"""What ferry tells about itself: OpenTelemetry, metrics, logs, masking, taps, throughput."""
