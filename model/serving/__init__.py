"""The host side of serving: requests and their limits, the scheduler that plans each step, output
processing (detokenisation, stops) and the driver loop that runs an engine. No Ray, no HTTP."""
