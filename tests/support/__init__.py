"""What tests and benchmarks share: the services they talk to, the fake safebooru, real and drawn images,
CLI runners, waiting, rows as the steps leave them, and the shared pytest fixtures. No test module
imports another test module; `bench/` imports only from here."""
