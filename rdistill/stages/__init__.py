"""The stages that run models on Ray (embed, synthesize), the job that chains them (pds) and its report."""
