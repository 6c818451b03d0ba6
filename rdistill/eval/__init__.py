"""The evaluation harness: student CLIPs trained on a distilled set, judged by retrieval recall (PDS section 4.1)."""
