"""What a person looks at: matplotlib figures written as PNG (galleries, sample grids, landscapes,
strip plots, the phase diagram, the audit's figures) and the HTML fragments of reports. The report
layer (diffmem.report, docs/api.md section 6) assembles them into pages."""
