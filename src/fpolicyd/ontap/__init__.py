"""The ONTAP REST side (layer 5, beside server/): what ``fpolicyd ontap plan|apply|repoint|status`` and
``ontap_repoint_on_start`` do to the SVM's FPolicy objects; the plan is sans-IO, the client runs it.
"""
